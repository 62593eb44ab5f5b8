//! `ratethrottle monitor`: a live terminal dashboard of a running server, fed by the admin
//! API's `WatchStats` stream.
//!
//! Views (keys `1`-`4`, Tab cycles): overview (requests/s and over-limit/s sparklines, storage,
//! config version, top limited descriptors), domains, blocked identities (with the token),
//! anomaly decisions. `q` or Esc quits. An unreachable server is shown as such, and retried.

use super::remote;
use crate::proto::admin::v1 as pb;
use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use parking_lot::Mutex;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Sparkline, Table, Tabs};
use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Admin address of a running `ratethrottle serve`.
    #[arg(
        long = "admin-addr",
        visible_alias = "addr",
        env = "RATETHROTTLE_ADMIN_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    admin_addr: String,
    /// The server's admin token: adds blocked identities and anomaly decisions.
    #[arg(long, env = "RATETHROTTLE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Milliseconds between snapshots.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u32,
}

/// Samples kept for the sparklines.
const HISTORY: usize = 240;
/// Wait before reconnecting to an unreachable server.
const RETRY: Duration = Duration::from_secs(2);

const VIEWS: [&str; 4] = [
    "1 Overview",
    "2 Domains",
    "3 Blocked identities",
    "4 Decisions",
];

#[derive(Debug, Default)]
struct View {
    last: Option<pb::StatsSnapshot>,
    requests: VecDeque<u64>,
    over_limit: VecDeque<u64>,
    decisions: Option<Result<Vec<pb::Decision>, String>>,
    /// Why there is no live data right now.
    error: Option<String>,
}

impl View {
    fn push(&mut self, s: pb::StatsSnapshot) {
        for (h, v) in [
            (&mut self.requests, s.requests_per_second),
            (&mut self.over_limit, s.over_limit_per_second),
        ] {
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(v.round() as u64);
        }
        self.last = Some(s);
        self.error = None;
    }
}

pub fn run(args: MonitorArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let view = Arc::new(Mutex::new(View::default()));
    rt.spawn(feed(
        args.admin_addr.clone(),
        args.token.clone(),
        args.interval_ms,
        view.clone(),
    ));
    let mut terminal = ratatui::init();
    let result = ui_loop(&mut terminal, &args, &view);
    ratatui::restore();
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: terminal: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    args: &MonitorArgs,
    view: &Mutex<View>,
) -> std::io::Result<()> {
    let mut tab = 0usize;
    loop {
        terminal.draw(|f| draw(f, args, &view.lock(), tab))?;
        if event::poll(Duration::from_millis(200))?
            && let Event::Key(k) = event::read()?
            && k.kind == KeyEventKind::Press
        {
            match k.code {
                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                KeyCode::Tab | KeyCode::Right => tab = (tab + 1) % VIEWS.len(),
                KeyCode::BackTab | KeyCode::Left => tab = (tab + VIEWS.len() - 1) % VIEWS.len(),
                KeyCode::Char(c @ '1'..='4') => tab = c as usize - '1' as usize,
                _ => {}
            }
        }
    }
}

/// Keeps `view` fed: connect, stream snapshots, and on any failure say why and retry.
async fn feed(addr: String, token: Option<String>, interval_ms: u32, view: Arc<Mutex<View>>) {
    loop {
        let error = match stream(&addr, token.as_deref(), interval_ms, &view).await {
            Ok(()) => "the server closed the stats stream".to_string(),
            Err(e) => e,
        };
        view.lock().error = Some(error);
        tokio::time::sleep(RETRY).await;
    }
}

async fn stream(
    addr: &str,
    token: Option<&str>,
    interval_ms: u32,
    view: &Mutex<View>,
) -> Result<(), String> {
    let mut client = remote::connect(addr).await?;
    let req = remote::request(
        pb::WatchStatsRequest {
            interval_ms,
            top_n: 20,
        },
        token,
    )?;
    let mut snaps = client
        .watch_stats(req)
        .await
        .map_err(|s| remote::status(&s))?
        .into_inner();
    while let Some(s) = snaps.next().await {
        let s = s.map_err(|s| remote::status(&s))?;
        let decisions = match token {
            None => Err("pass --token to see anomaly decisions".to_string()),
            Some(_) => match client
                .list_decisions(remote::request(pb::ListDecisionsRequest::default(), token)?)
                .await
            {
                Ok(r) => Ok(r.into_inner().decisions),
                Err(s) => Err(remote::status(&s)),
            },
        };
        let mut v = view.lock();
        v.push(s);
        v.decisions = Some(decisions);
    }
    Ok(())
}

fn draw(f: &mut Frame, args: &MonitorArgs, view: &View, tab: usize) {
    let [header, tabs, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let version = view
        .last
        .as_ref()
        .map_or("-".to_string(), |s| s.config_version.clone());
    let status = match &view.error {
        Some(_) => Span::red("UNREACHABLE"),
        None if view.last.is_none() => Span::plain("connecting"),
        None => Span::plain("live"),
    };
    f.render_widget(
        Paragraph::new(Line::from(vec![
            ratatui::text::Span::styled(
                "ratethrottle monitor ",
                Style::default().add_modifier(Modifier::BOLD),
            ),
            ratatui::text::Span::raw(format!("{}  config {version}  ", args.admin_addr)),
            status.into(),
        ])),
        header,
    );
    f.render_widget(
        Tabs::new(VIEWS)
            .select(tab)
            .highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
        tabs,
    );
    f.render_widget(
        Paragraph::new("q quit  1-4/Tab switch view")
            .style(Style::default().add_modifier(Modifier::DIM)),
        footer,
    );
    if let Some(e) = &view.error {
        f.render_widget(
            Paragraph::new(vec![
                Line::from(format!("cannot show live data: {e}")),
                Line::from(format!("retrying every {}s; q quits", RETRY.as_secs())),
            ])
            .wrap(ratatui::widgets::Wrap { trim: true })
            .block(Block::bordered().title("server unreachable"))
            .style(Style::default().fg(Color::Red)),
            body,
        );
        return;
    }
    let Some(s) = &view.last else {
        f.render_widget(
            Paragraph::new(format!("connecting to {} ...", args.admin_addr)),
            body,
        );
        return;
    };
    match tab {
        0 => overview(f, body, view, s),
        1 => domains(f, body, s),
        2 => identities(f, body, s),
        _ => decisions(f, body, view),
    }
}

/// A header span, red or plain.
enum Span {
    Red(&'static str),
    Plain(&'static str),
}

impl Span {
    fn red(s: &'static str) -> Span {
        Span::Red(s)
    }
    fn plain(s: &'static str) -> Span {
        Span::Plain(s)
    }
}

impl From<Span> for ratatui::text::Span<'static> {
    fn from(s: Span) -> Self {
        match s {
            Span::Red(t) => ratatui::text::Span::styled(t, Style::default().fg(Color::Red)),
            Span::Plain(t) => ratatui::text::Span::raw(t),
        }
    }
}

fn overview(f: &mut Frame, area: ratatui::layout::Rect, view: &View, s: &pb::StatsSnapshot) {
    let [sparks, info, top] = Layout::vertical([
        Constraint::Length(10),
        Constraint::Length(4),
        Constraint::Min(3),
    ])
    .areas(area);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(sparks);
    let tail = |h: &VecDeque<u64>, width: u16| -> Vec<u64> {
        let n = usize::from(width.saturating_sub(2));
        h.iter().skip(h.len().saturating_sub(n)).copied().collect()
    };
    f.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(format!(
                "requests/s {:.1} ({} total)",
                s.requests_per_second, s.requests_total
            )))
            .data(tail(&view.requests, left.width))
            .style(Style::default().fg(Color::Green)),
        left,
    );
    f.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(format!(
                "over-limit/s {:.1} ({} total)",
                s.over_limit_per_second, s.over_limit_total
            )))
            .data(tail(&view.over_limit, right.width))
            .style(Style::default().fg(Color::Red)),
        right,
    );
    let st = s.storage.clone().unwrap_or_default();
    let q = s.queues.unwrap_or_default();
    let a = s.authz.clone().unwrap_or_default();
    let storage = format!(
        "storage {} {}{}  errors {}  fallbacks {}",
        st.kind,
        if st.degraded { "DEGRADED" } else { "ok" },
        if st.kind == "redis" {
            format!(" ping {:.2} ms", st.ping_ms)
        } else {
            format!(" keys {}/{}", st.memory_keys, st.memory_capacity)
        },
        st.errors_total,
        st.fallbacks_total
    );
    let queues = format!(
        "ext_authz {:.1} checks/s {:.1} denied/s  violations recorded {} sampled out {} dropped {}",
        a.checks_per_second,
        a.denied_per_second,
        q.violations_recorded,
        q.violations_sampled_out,
        q.violations_dropped
    );
    f.render_widget(
        Paragraph::new(vec![Line::from(storage), Line::from(queues)])
            .block(Block::bordered().title("health")),
        info,
    );
    let rows = s.top_limited.iter().map(|d| {
        Row::new(vec![
            d.stat_key.clone(),
            format!("{:.1}", d.over_limit_per_second),
            d.over_limit_total.to_string(),
            d.hits_total.to_string(),
        ])
    });
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Min(30),
                Constraint::Length(12),
                Constraint::Length(12),
                Constraint::Length(12),
            ],
        )
        .header(
            Row::new(vec!["descriptor", "over/s", "over total", "hits"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title("top limited descriptors")),
        top,
    );
}

fn domains(f: &mut Frame, area: ratatui::layout::Rect, s: &pb::StatsSnapshot) {
    let rows = s.domains.iter().map(|d| {
        Row::new(vec![
            d.domain.clone(),
            format!("{:.1}", d.hits_per_second),
            format!("{:.1}", d.over_limit_per_second),
            d.hits_total.to_string(),
            d.over_limit_total.to_string(),
        ])
    });
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Min(20),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(12),
                Constraint::Length(12),
            ],
        )
        .header(
            Row::new(vec!["domain", "hits/s", "over/s", "hits", "over total"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title("domains")),
        area,
    );
}

fn identities(f: &mut Frame, area: ratatui::layout::Rect, s: &pb::StatsSnapshot) {
    let block = Block::bordered().title("blocked identities (recent violations)");
    if s.identities_redacted {
        f.render_widget(
            Paragraph::new("hidden: pass --token (the admin token) to see identities").block(block),
            area,
        );
        return;
    }
    let rows = s
        .blocked_identities
        .iter()
        .map(|i| Row::new(vec![i.identity.clone(), i.count.to_string()]));
    f.render_widget(
        Table::new(rows, [Constraint::Min(30), Constraint::Length(10)])
            .header(
                Row::new(vec!["identity", "events"])
                    .style(Style::default().add_modifier(Modifier::BOLD)),
            )
            .block(block),
        area,
    );
}

fn decisions(f: &mut Frame, area: ratatui::layout::Rect, view: &View) {
    let block = Block::bordered().title("anomaly decisions");
    match &view.decisions {
        None => f.render_widget(Paragraph::new("loading").block(block), area),
        Some(Err(e)) => f.render_widget(Paragraph::new(e.clone()).block(block), area),
        Some(Ok(d)) if d.is_empty() => {
            f.render_widget(Paragraph::new("no decisions in force").block(block), area)
        }
        Some(Ok(d)) => {
            let rows = d.iter().map(|d| {
                Row::new(vec![
                    d.value.clone(),
                    pb::DecisionAction::try_from(d.action)
                        .map_or("?", |a| a.as_str_name())
                        .to_string(),
                    d.reason.clone(),
                    format!("{:.2}", d.score),
                ])
            });
            f.render_widget(
                Table::new(
                    rows,
                    [
                        Constraint::Min(20),
                        Constraint::Length(24),
                        Constraint::Min(20),
                        Constraint::Length(8),
                    ],
                )
                .header(Row::new(vec!["subject", "action", "reason", "score"]))
                .block(block),
                area,
            );
        }
    }
}
