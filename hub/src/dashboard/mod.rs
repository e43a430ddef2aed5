//! The live dashboard every hub serves at `/` on its HTTP port: hubs and leader, nodes
//! and their MCP servers, the queue by tenant, running and recently finished tasks, and
//! per-tool charts, pushed to the page once a second (server-sent events). The page is
//! three files compiled into the binary; there is no build step.
//!
//! Login, as Jupyter does it: `flotilla dashboard` (an admin call) asks a hub for a
//! one-time ticket that lives five minutes and prints a URL carrying it; opening the URL
//! trades the ticket for a session cookie (HttpOnly, SameSite=Strict, twelve hours) and
//! drops the ticket from the address bar. Tickets and sessions are this hub's own (in
//! memory, bounded). Any agent token may ask for a ticket (`CreateDashboardLogin`), and the
//! page shows what that token may see: an admin, the whole cluster; anyone else, their own
//! tenant's queue, tasks and tool figures, and no hubs or nodes (as the API shows them).

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        Html, IntoResponse, Response,
    },
    routing::get,
    Router,
};
use rand::RngCore;
use serde_json::{json, Value};

use flotilla_common::jwt::{self, Claims};

use flotilla_proto as pb;

use crate::{
    cluster::Hub,
    raft::peer::ClusterView,
    state::{Lookup, TaskRecord},
};

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// How long a login ticket may wait to be used.
pub const TICKET_TTL: Duration = Duration::from_secs(300);
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const MAX_TICKETS: usize = 64;
const MAX_SESSIONS: usize = 256;
/// Pages open at once (each holds a stream).
const MAX_STREAMS: usize = 32;
/// What one viewer (a subject of a tenant) may hold, so that nobody can use up what the
/// others need: a tenant asking for tickets and sessions in a loop evicts only its own.
const TICKETS_PER_VIEWER: usize = 4;
const SESSIONS_PER_VIEWER: usize = 8;
const STREAMS_PER_VIEWER: usize = 4;
/// Stream places only admins may take.
const ADMIN_STREAMS: usize = 8;
const COOKIE: &str = "flotilla_dashboard";
/// Tasks listed as running and as recently finished.
const RUNNING_SHOWN: usize = 50;
const RECENT_SHOWN: usize = 20;
/// Progress events shown in a task's detail.
const PROGRESS_SHOWN: usize = 50;

/// Who a dashboard session belongs to, and what it may see.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Viewer {
    pub subject: String,
    /// The tenant whose work the page shows; `None` for an admin, who sees everything.
    pub tenant: Option<String>,
}

impl Viewer {
    /// What the holder of `claims` may see.
    pub fn of(claims: &Claims) -> Self {
        Self {
            subject: claims.sub.clone(),
            tenant: (!claims.may(jwt::ADMIN_READ)).then(|| claims.tenant.clone()),
        }
    }

    fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

struct Login {
    viewer: Viewer,
    /// The agent token that asked for the login: the session lives only while the cluster
    /// still accepts it (not revoked, its key not retired).
    token: String,
    expires: Instant,
    /// When a session made from it ends (a ticket's): twelve hours, or sooner if the token
    /// that asked expires sooner.
    session_until: Instant,
}

/// This hub's login tickets and sessions.
#[derive(Default)]
pub struct Dashboard {
    tickets: Mutex<HashMap<String, Login>>,
    sessions: Mutex<HashMap<String, Login>>,
    /// Pages streaming now, by viewer.
    streams: Mutex<HashMap<Viewer, usize>>,
    /// The last view of the cluster and when it was taken: asking every hub for its HTTP
    /// address once a second per open page would be wasteful.
    cluster: Mutex<Option<(Instant, ClusterView)>>,
}

fn secret() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Keeps the unexpired entries, at most `per` of `login`'s viewer and `max` in all: when
/// full, the entry that expires first goes, of `login`'s viewer, else of the viewer that
/// holds the most.
fn bounded_insert(
    m: &mut HashMap<String, Login>,
    key: String,
    login: Login,
    per: usize,
    max: usize,
) {
    let now = Instant::now();
    m.retain(|_, l| l.expires > now);
    let first_of = |m: &HashMap<String, Login>, v: &Viewer| {
        m.iter()
            .filter(|(_, l)| &l.viewer == v)
            .min_by_key(|(_, l)| l.expires)
            .map(|(k, _)| k.clone())
    };
    while m.values().filter(|l| l.viewer == login.viewer).count() >= per {
        let Some(k) = first_of(m, &login.viewer) else {
            break;
        };
        m.remove(&k);
    }
    while m.len() >= max {
        let mut held: HashMap<&Viewer, usize> = HashMap::new();
        for l in m.values() {
            *held.entry(&l.viewer).or_default() += 1;
        }
        let Some(most) = held
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(v, _)| v.clone())
        else {
            break;
        };
        let Some(k) = first_of(m, &most) else { break };
        m.remove(&k);
    }
    m.insert(key, login);
}

impl Dashboard {
    /// A new one-time login ticket for `viewer`, whose token is valid until `token_expires_ms`
    /// (the session ends then too).
    pub fn ticket(&self, viewer: Viewer, token: &str, token_expires_ms: i64) -> String {
        let t = secret();
        let token_left =
            Duration::from_millis((token_expires_ms - flotilla_common::now_ms()).max(0) as u64);
        let login = Login {
            viewer,
            token: token.to_owned(),
            expires: Instant::now() + TICKET_TTL.min(token_left),
            session_until: Instant::now() + SESSION_TTL.min(token_left),
        };
        bounded_insert(
            &mut self.tickets.lock().expect("tickets lock"),
            t.clone(),
            login,
            TICKETS_PER_VIEWER,
            MAX_TICKETS,
        );
        t
    }

    /// Trades a ticket (once) for a session id.
    fn redeem(&self, ticket: &str) -> Option<String> {
        let login = self.tickets.lock().expect("tickets lock").remove(ticket)?;
        if login.expires <= Instant::now() {
            return None;
        }
        let id = secret();
        let session = Login {
            viewer: login.viewer,
            token: login.token,
            expires: login.session_until,
            session_until: login.session_until,
        };
        bounded_insert(
            &mut self.sessions.lock().expect("sessions lock"),
            id.clone(),
            session,
            SESSIONS_PER_VIEWER,
            MAX_SESSIONS,
        );
        Some(id)
    }

    /// Takes a stream place for `viewer`, or says why there is none.
    fn take_stream(&self, viewer: &Viewer) -> Result<(), &'static str> {
        let mut streams = self.streams.lock().expect("streams lock");
        let total: usize = streams.values().sum();
        let mine = streams.get(viewer).copied().unwrap_or(0);
        if mine >= STREAMS_PER_VIEWER {
            return Err("too many dashboard pages open for this login on this hub");
        }
        let room = if viewer.tenant.is_none() {
            MAX_STREAMS
        } else {
            MAX_STREAMS - ADMIN_STREAMS
        };
        let tenants: usize = streams
            .iter()
            .filter(|(v, _)| v.tenant.is_some())
            .map(|(_, n)| n)
            .sum();
        let used = if viewer.tenant.is_none() {
            total
        } else {
            tenants
        };
        if used >= room || total >= MAX_STREAMS {
            return Err("too many dashboard pages open on this hub");
        }
        *streams.entry(viewer.clone()).or_default() += 1;
        Ok(())
    }

    fn drop_stream(&self, viewer: &Viewer) {
        let mut streams = self.streams.lock().expect("streams lock");
        if let Some(n) = streams.get_mut(viewer) {
            *n -= 1;
            if *n == 0 {
                streams.remove(viewer);
            }
        }
    }

    /// The request's session id and who it belongs to, if it is a live session.
    fn session(&self, hub: &Hub, headers: &HeaderMap) -> Option<(String, Viewer)> {
        let id = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))?;
        let who = self.viewer(hub, id)?;
        Some((id.to_owned(), who))
    }

    /// Who session `id` belongs to, while it lives, and the token that made it.
    fn login(&self, id: &str) -> Option<(Viewer, String)> {
        let sessions = self.sessions.lock().expect("sessions lock");
        let s = sessions.get(id)?;
        (s.expires > Instant::now()).then(|| (s.viewer.clone(), s.token.clone()))
    }

    /// Who session `id` belongs to, while it lives and the cluster still accepts the token
    /// that made it (a revoked token, or one whose key was retired, ends it at once), with
    /// what its token may see now (its roles as they stand).
    fn viewer(&self, hub: &Hub, id: &str) -> Option<Viewer> {
        let (_, token) = self.login(id)?;
        match crate::auth::check_token(hub, &token) {
            Ok(claims) => Some(Viewer::of(&claims)),
            Err(_) => {
                self.sessions.lock().expect("sessions lock").remove(id);
                None
            }
        }
    }

    fn who(&self, hub: &Hub, headers: &HeaderMap) -> Option<Viewer> {
        self.session(hub, headers).map(|(_, who)| who)
    }

    /// The cluster's members and leader, at most two seconds old.
    async fn cluster(&self, hub: &Hub) -> ClusterView {
        if let Some((at, v)) = &*self.cluster.lock().expect("cluster view lock") {
            if at.elapsed() < Duration::from_secs(2) {
                return v.clone();
            }
        }
        let v = hub.cluster_view().await;
        *self.cluster.lock().expect("cluster view lock") = Some((Instant::now(), v.clone()));
        v
    }

    /// Pages streaming now.
    pub fn streams(&self) -> usize {
        self.streams.lock().expect("streams lock").values().sum()
    }
}

/// The dashboard's routes, merged into the hub's HTTP router.
pub fn routes() -> Router<Hub> {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login))
        .route(
            "/assets/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    APP_JS,
                )
            }),
        )
        .route(
            "/assets/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }),
        )
        .route("/api/overview", get(overview_json))
        .route("/api/stream", get(stream))
        .route("/api/task", get(task_json))
}

fn signed_out() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(
            "<!doctype html><title>Flotilla</title><h1>Flotilla</h1>\
             <p>Not signed in, or the login link was already used or has expired. \
             Run <code>flotilla dashboard</code> for a new link (it works once, for five minutes).</p>",
        ),
    )
        .into_response()
}

async fn index(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    match hub.dashboard.who(&hub, &headers) {
        Some(_) => Html(INDEX).into_response(),
        None => signed_out(),
    }
}

#[derive(serde::Deserialize)]
struct Ticket {
    ticket: String,
}

async fn login(State(hub): State<Hub>, Query(t): Query<Ticket>) -> Response {
    let Some(session) = hub.dashboard.redeem(&t.ticket) else {
        tracing::info!("dashboard login refused: unknown, used or expired ticket");
        return signed_out();
    };
    // Over TLS the cookie is never sent over plain HTTP.
    let secure = if hub.http_url().starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    // A page that moves on to `/` itself rather than a redirect: a link opened from another
    // site (a chat, a wiki) is a cross-site navigation, and the Strict cookie would not go
    // with the redirect's second request; the page's own move is same-site.
    let page =
        "<!doctype html><meta http-equiv=\"refresh\" content=\"0;url=/\"><title>Flotilla</title>\
                <p>Signed in. <a href=\"/\">Open the dashboard</a>.</p>";
    ([(header::SET_COOKIE, cookie)], Html(page)).into_response()
}

async fn overview_json(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    let Some(who) = hub.dashboard.who(&hub, &headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    axum::Json(page_json(&overview(&hub, &who).await)).into_response()
}

/// Holds one of the stream places while a page streams.
struct StreamPlace(Hub, Viewer);

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.0.dashboard.drop_stream(&self.1);
    }
}

async fn stream(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    let Some((session, viewer)) = hub.dashboard.session(&hub, &headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    if let Err(why) = hub.dashboard.take_stream(&viewer) {
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    }
    let place = StreamPlace(hub.clone(), viewer);
    let events = futures::stream::unfold(place, move |place| {
        let session = session.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // A session that expired (or was pushed out by newer ones) ends its streams.
            let who = place.0.dashboard.viewer(&place.0, &session)?;
            let o = page_json(&overview(&place.0, &who).await);
            let e = Event::default().event("overview").data(o.to_string());
            Some((Ok::<_, Infallible>(e), place))
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(serde::Deserialize)]
struct TaskQuery {
    id: String,
}

async fn task_json(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Query(q): Query<TaskQuery>,
) -> Response {
    let Some(who) = hub.dashboard.who(&hub, &headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let missing = |why: String| (StatusCode::NOT_FOUND, axum::Json(json!({"error": why})));
    if q.id.is_empty() || q.id.len() > 128 {
        return missing(format!("no task {:?}", q.id)).into_response();
    }
    let found = hub.state().find_task(&q.id);
    match found {
        Ok(Lookup::Found(t)) if who.sees(&t.tenant) => {
            axum::Json(task_detail(&hub, &t)).into_response()
        }
        Ok(Lookup::Expired { tenant, .. }) if who.sees(&tenant) => missing(format!(
            "task {:?} expired: finished work is kept only as long as the hub's retention",
            q.id
        ))
        .into_response(),
        Ok(_) => missing(format!("no task {:?}", q.id)).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: reading a task from the history store failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the history store failed",
            )
                .into_response()
        }
    }
}

/// One task as its detail panel shows it: what it is, its attempts, and its story as a
/// list of events (from its record, which every hub holds, and the progress this hub saw).
fn task_detail(hub: &Hub, t: &TaskRecord) -> Value {
    let started = |a: &crate::state::AttemptRecord| {
        a.started_at_ms
            .or_else(|| hub.events.started_at(&t.id, a.number))
    };
    let mut events = vec![
        json!({"at_ms": t.created_at_ms, "what": "submitted", "detail": format!("by {}", t.agent)}),
    ];
    for a in &t.attempts {
        let on = json!({"node": a.node_id, "attempt": a.number});
        let event = |at: i64, what: &str, detail: String| {
            let mut e = on.clone();
            e["at_ms"] = json!(at);
            e["what"] = json!(what);
            e["detail"] = json!(detail);
            e
        };
        events.push(event(
            a.assigned_at_ms,
            "assigned",
            format!("attempt {} to {} ({})", a.number, a.node_id, a.server),
        ));
        if let Some(at) = started(a) {
            events.push(event(at, "started", String::new()));
        }
        // The last attempt of an ended task ends with the task's own event below.
        let last = t.status.is_terminal() && a.number == t.attempts.last().map_or(0, |l| l.number);
        if let Some(at) = a.finished_at_ms.filter(|_| !last) {
            let what = if a.requeued {
                "taken back"
            } else {
                "attempt ended"
            };
            events.push(event(at, what, a.error.clone().unwrap_or_default()));
        }
    }
    for p in hub.events.progress_of(&t.id, PROGRESS_SHOWN) {
        let total = p.total.map(|t| format!(" of {t}")).unwrap_or_default();
        events.push(json!({
            "at_ms": p.at_ms, "what": "progress", "node": p.node_id, "attempt": p.attempt,
            "detail": format!("{}{total} {}", p.progress, p.message).trim().to_owned(),
        }));
    }
    if t.status.is_terminal() {
        events.push(json!({
            "at_ms": t.updated_at_ms, "what": t.status.as_str(),
            "detail": t.error.clone().unwrap_or_default(),
        }));
    }
    events.sort_by_key(|e| e["at_ms"].as_i64().unwrap_or_default());
    let running = t.current_attempt().and_then(started).is_some() && t.status.is_active();
    json!({
        "id": t.id,
        "tool": t.tool,
        "tenant": t.tenant,
        "agent": t.agent,
        "status": if running { "running" } else { t.status.as_str() },
        "terminal": t.status.is_terminal(),
        "created_ms": t.created_at_ms,
        "updated_ms": t.updated_at_ms,
        "dead_lettered": t.dead_lettered,
        "error": t.error,
        "attempts": t.attempts.iter().map(|a| json!({
            "number": a.number, "node": a.node_id, "server": a.server,
            "assigned_ms": a.assigned_at_ms, "started_ms": started(a),
            "finished_ms": a.finished_at_ms, "error": a.error, "requeued": a.requeued,
        })).collect::<Vec<_>>(),
        "events": events,
    })
}

/// What the page (and `GetOverview`) shows, as `who` may see it: an admin, everything;
/// anyone else, their tenant's queue, tasks and tool figures, and no hubs or nodes.
pub async fn overview(hub: &Hub, who: &Viewer) -> pb::Overview {
    let admin = who.tenant.is_none();
    let (cluster, nodes) = if admin {
        let live = hub.live_nodes().await;
        (
            Some(crate::service::admin::status_response(
                hub.dashboard.cluster(hub).await,
            )),
            crate::service::admin::node_infos(hub, &live),
        )
    } else {
        (None, Vec::new())
    };
    let (queue, running) = {
        let state = hub.state();
        let queue = state
            .index
            .queue
            .iter()
            .filter(|(tenant, q)| !q.is_empty() && who.sees(tenant))
            .map(|(tenant, q)| pb::TenantQueue {
                tenant: tenant.clone(),
                queued: q.len() as u64,
            })
            .collect();
        let since = |t: &TaskRecord| {
            t.current_attempt().map_or(t.created_at_ms, |a| {
                a.started_at_ms
                    .or_else(|| hub.events.started_at(&t.id, a.number))
                    .unwrap_or(a.assigned_at_ms)
            })
        };
        let mut longest: Vec<(i64, &TaskRecord)> = state
            .index
            .on_node
            .values()
            .flatten()
            .filter_map(|id| state.tasks.get(id))
            .filter(|t| who.sees(&t.tenant))
            .map(|t| (since(t), t))
            .collect();
        longest.sort_by_key(|(s, t)| (*s, &t.id));
        longest.truncate(RUNNING_SHOWN);
        let running = longest
            .into_iter()
            .map(|(since_ms, t)| pb::TaskBrief {
                id: t.id.clone(),
                tool: t.tool.clone(),
                tenant: t.tenant.clone(),
                // The node's word that it started is the leader's alone (not replicated).
                status: match t.current_attempt() {
                    Some(a) if hub.events.started_at(&t.id, a.number).is_some() => {
                        "running".to_owned()
                    }
                    _ => t.status.as_str().to_owned(),
                },
                node: t
                    .current_attempt()
                    .map(|a| a.node_id.clone())
                    .unwrap_or_default(),
                since_ms,
                took_ms: 0,
            })
            .collect();
        (queue, running)
    };
    let history = hub.state().history.clone();
    let recent = match &who.tenant {
        None => history.recent(RECENT_SHOWN),
        Some(tenant) => history.list(tenant, false, RECENT_SHOWN, |_| true),
    };
    let recent = recent
        .unwrap_or_default()
        .into_iter()
        .map(|t| pb::TaskBrief {
            took_ms: (t.updated_at_ms - t.created_at_ms).max(0),
            since_ms: t.updated_at_ms,
            node: t
                .attempts
                .last()
                .map(|a| a.node_id.clone())
                .unwrap_or_default(),
            status: t.status.as_str().to_owned(),
            id: t.id,
            tool: t.tool,
            tenant: t.tenant,
        })
        .collect();
    let tools = hub
        .metrics
        .tool_totals(who.tenant.as_deref())
        .into_iter()
        .map(|t| pb::ToolFigures {
            tool: t.tool,
            succeeded: t.succeeded,
            failed: t.failed,
            seconds_sum: t.seconds_sum,
            seconds_count: t.seconds_count,
        })
        .collect();
    pb::Overview {
        now_ms: flotilla_common::now_ms(),
        hub_id: hub.id(),
        subject: who.subject.clone(),
        admin,
        tenant: who.tenant.clone().unwrap_or_default(),
        cluster,
        nodes,
        queue,
        running,
        recent,
        tools,
    }
}

/// The overview in the shape the page reads.
fn page_json(o: &pb::Overview) -> Value {
    let cluster = o.cluster.clone().unwrap_or_default();
    json!({
        "now_ms": o.now_ms,
        "hub": {"id": o.hub_id, "identity": o.subject, "tenant": o.tenant, "admin": o.admin},
        "leader_id": (cluster.leader_id != 0).then_some(cluster.leader_id),
        "term": cluster.term,
        "members": cluster.members.iter().map(|m| json!({
            "id": m.id, "role": m.role, "api": m.address, "http": m.http_address, "lag": m.lag,
        })).collect::<Vec<_>>(),
        "nodes": o.nodes.iter().map(|n| json!({
            "id": n.id,
            "status": n.status,
            "connected": n.connected,
            "region": n.labels.get("region"),
            "zone": n.labels.get("zone"),
            "cpu_percent": n.cpu_percent,
            "running": n.running,
            "servers": n.servers.iter().map(|s| json!({
                "name": s.name, "state": s.state, "running": s.running,
                "max_concurrency": s.max_concurrency, "error": s.error,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "queue": o.queue.iter().map(|q| json!({"tenant": q.tenant, "queued": q.queued})).collect::<Vec<_>>(),
        "running": o.running.iter().map(|t| json!({
            "id": t.id, "tool": t.tool, "tenant": t.tenant, "status": t.status,
            "node": (!t.node.is_empty()).then_some(&t.node), "since_ms": t.since_ms,
        })).collect::<Vec<_>>(),
        "recent": o.recent.iter().map(|t| json!({
            "id": t.id, "tool": t.tool, "tenant": t.tenant, "status": t.status,
            "ended_ms": t.since_ms, "took_ms": t.took_ms,
        })).collect::<Vec<_>>(),
        "tools": o.tools.iter().map(|t| json!({
            "tool": t.tool, "succeeded": t.succeeded, "failed": t.failed,
            "seconds_sum": t.seconds_sum, "seconds_count": t.seconds_count,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewer(subject: &str, tenant: Option<&str>) -> Viewer {
        Viewer {
            subject: subject.into(),
            tenant: tenant.map(Into::into),
        }
    }

    fn in_an_hour() -> i64 {
        flotilla_common::now_ms() + 3_600_000
    }

    #[test]
    fn a_tenant_asking_in_a_loop_evicts_only_its_own_logins() {
        let d = Dashboard::default();
        let admin = viewer("ops", None);
        let mallory = viewer("mallory", Some("t"));
        let admin_session = d
            .redeem(&d.ticket(admin.clone(), "t", in_an_hour()))
            .unwrap();
        let mut kept = Vec::new();
        for _ in 0..1000 {
            if let Some(s) = d.redeem(&d.ticket(mallory.clone(), "t", in_an_hour())) {
                kept.push(s);
            }
        }
        assert_eq!(d.login(&admin_session).map(|l| l.0), Some(admin.clone()));
        let live = kept.iter().filter(|s| d.login(s).is_some()).count();
        assert_eq!(live, SESSIONS_PER_VIEWER);
        // Unused tickets are capped per viewer too, and the admin's survives the flood.
        let admin_ticket = d.ticket(admin.clone(), "t", in_an_hour());
        for _ in 0..1000 {
            d.ticket(mallory.clone(), "t", in_an_hour());
        }
        assert!(d.redeem(&admin_ticket).is_some());
    }

    #[test]
    fn a_session_ends_when_the_token_that_asked_for_it_expires() {
        let d = Dashboard::default();
        let v = viewer("short", Some("t"));
        let gone = d.redeem(&d.ticket(v.clone(), "t", flotilla_common::now_ms() - 1));
        assert!(gone.is_none(), "an expired token's ticket is refused");
        let s = d
            .redeem(&d.ticket(v.clone(), "t", flotilla_common::now_ms() + 60_000))
            .unwrap();
        let sessions = d.sessions.lock().unwrap();
        let left = sessions[&s].expires - Instant::now();
        assert!(left <= Duration::from_secs(60), "{left:?}");
    }

    #[test]
    fn stream_places_are_capped_per_viewer_and_some_are_kept_for_admins() {
        let d = Dashboard::default();
        let admin = viewer("ops", None);
        for i in 0.. {
            let v = viewer(&format!("t{i}"), Some("t"));
            let taken = (0..10).filter(|_| d.take_stream(&v).is_ok()).count();
            assert!(taken <= STREAMS_PER_VIEWER);
            if taken == 0 {
                break;
            }
        }
        assert_eq!(d.streams(), MAX_STREAMS - ADMIN_STREAMS);
        for _ in 0..STREAMS_PER_VIEWER {
            d.take_stream(&admin).unwrap();
        }
        assert!(d.take_stream(&admin).is_err(), "per-viewer cap");
        d.drop_stream(&admin);
        d.take_stream(&admin).unwrap();
    }
}
