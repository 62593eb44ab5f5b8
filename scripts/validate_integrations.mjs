// Validates Kubernetes manifests of Istio, Envoy Gateway, Contour and the Gateway API against
// the schemas the npm packages @kubernetes-models/{istio,envoy-gateway,contour,gateway-api}
// publish, in two passes per object:
//   1. the package's JSON schema validator (required fields, types, enums, patterns);
//   2. TypeScript's excess-property check of the object against the package's interface,
//      which catches misspelled or unknown fields (the CRD schemas allow unknown fields and
//      the API server would silently prune them).
//
// Usage: node scripts/validate_integrations.mjs <node_modules dir> <file.yaml>...
// Prints one JSON line per object: {file, kind, name, status, detail}, status "valid",
// "invalid", "partial" (the package's schema leaves `spec` unchecked) or "unchecked" (no
// package publishes a schema for the API group). Exits 1 when any object is invalid.
// scripts/integration-tools.sh installs the packages (pinned) and TypeScript.
import { readFileSync, writeFileSync, mkdtempSync, rmSync, existsSync } from "node:fs";
import { join, dirname } from "node:path";
import { pathToFileURL } from "node:url";
import { spawnSync } from "node:child_process";

const [modules, ...files] = process.argv.slice(2);
if (!modules || files.length === 0) {
  console.error("usage: validate_integrations.mjs <node_modules dir> <file.yaml>...");
  process.exit(2);
}
const yaml = (await import(pathToFileURL(join(modules, "js-yaml/index.js")))).default;

// API group → the package that publishes its schemas.
function packageOf(group) {
  if (group === "gateway.envoyproxy.io") return "@kubernetes-models/envoy-gateway";
  if (group === "gateway.networking.k8s.io") return "@kubernetes-models/gateway-api";
  if (group === "projectcontour.io") return "@kubernetes-models/contour";
  if (group.endsWith(".istio.io")) return "@kubernetes-models/istio";
  return null;
}

const results = [];
const strict = []; // objects for the TypeScript pass
for (const file of files) {
  const docs = yaml.loadAll(readFileSync(file, "utf8")).filter((d) => d != null);
  for (const doc of docs) {
    const kind = doc.kind ?? "?";
    const name = doc.metadata?.name ?? "?";
    const r = { file, kind, name, status: "valid", detail: "" };
    results.push(r);
    const [group, version] = String(doc.apiVersion ?? "").includes("/")
      ? doc.apiVersion.split("/")
      : ["", doc.apiVersion];
    const pkg = packageOf(group);
    if (!pkg) {
      r.status = "unchecked";
      r.detail = `no package publishes schemas for ${doc.apiVersion}`;
      continue;
    }
    const dir = join(modules, pkg, group, version);
    const classFile = join(dir, `${kind}.js`);
    if (!existsSync(classFile)) {
      r.status = "invalid";
      r.detail = `${pkg} has no ${kind} in ${doc.apiVersion}`;
      continue;
    }
    const Model = (await import(pathToFileURL(classFile)))[kind];
    try {
      new Model(doc).validate();
    } catch (e) {
      r.status = "invalid";
      r.detail = String(e.message ?? e);
      continue;
    }
    const dts = readFileSync(join(dir, `${kind}.d.ts`), "utf8");
    const iface = dts.slice(dts.indexOf(`export interface I${kind}`));
    const body = iface.slice(0, iface.indexOf("\n}"));
    if ("spec" in doc && !body.includes('"spec"')) {
      r.status = "partial";
      r.detail = `${pkg}'s ${kind} schema leaves spec unchecked`;
      continue;
    }
    strict.push({ r, pkg, group, version, kind, doc });
  }
}

// TypeScript pass: each object as a typed constant; excess properties are errors.
if (strict.length > 0) {
  const tmp = mkdtempSync(join(dirname(modules), "validate-"));
  try {
    const lines = strict.map(
      (s, i) =>
        `import type { I${s.kind} as T${i} } from "${s.pkg}/${s.group}/${s.version}/${s.kind}";\n` +
        `export const o${i}: T${i} = ${JSON.stringify(s.doc)};`,
    );
    writeFileSync(join(tmp, "objects.ts"), lines.join("\n") + "\n");
    const tsc = join(modules, "typescript/bin/tsc");
    const out = spawnSync(
      process.execPath,
      [tsc, "--noEmit", "--strict", "--skipLibCheck", "--module", "nodenext",
        "--moduleResolution", "nodenext", join(tmp, "objects.ts")],
      { encoding: "utf8", cwd: tmp },
    );
    const text = `${out.stdout}${out.stderr}`;
    if (out.status !== 0 && !/objects\.ts\(\d+,/.test(text)) {
      console.error(`tsc failed:\n${text}`);
      process.exit(2);
    }
    for (const m of text.matchAll(/objects\.ts\((\d+),\d+\): error TS\d+: (.*)/g)) {
      const s = strict[Math.floor((Number(m[1]) - 1) / 2)];
      s.r.status = "invalid";
      s.r.detail += (s.r.detail ? "; " : "") + m[2];
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

for (const r of results) console.log(JSON.stringify(r));
process.exit(results.some((r) => r.status === "invalid") ? 1 : 0);
