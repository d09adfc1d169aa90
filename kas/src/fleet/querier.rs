//! Where an agent's tunnels are, asked of Redis by one poller per agent on this pod, shared
//! by every request waiting for that agent (the lesson of gitlab-agent#351: a flood of
//! requests for an absent agent must not multiply Redis calls). A poller reads the agent's
//! hash every 50 ms while anyone watches and stops when nobody does; its last answer is
//! kept for the next request and forgotten 5 minutes after the poller stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::redis::Redis;
use super::tunnel_tracker::kas_urls;

/// Between two reads of one agent's hash (real kas: 50 ms).
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a stopped poller's last answer is kept (real kas: 5 min).
pub const CACHE_PERIOD: Duration = Duration::from_secs(300);

/// What a poller knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not asked yet.
    Pending,
    /// The private API URLs of the pods with ready tunnels of the agent.
    Urls(Arc<[String]>),
    /// Redis failed; the text says how. `last` is the last answer it gave (empty if none),
    /// which callers may still try.
    Failed { error: String, last: Arc<[String]> },
}

struct Entry {
    tx: watch::Sender<Lookup>,
    watchers: usize,
    /// When the last watcher left (for the cache period).
    idle_since: Option<Instant>,
    /// Whether its poller runs (it stops by itself once nobody watches).
    polling: bool,
}

struct Inner {
    redis: Arc<Redis>,
    entries: Mutex<HashMap<i64, Entry>>,
    max_agents: usize,
}

/// The pollers of this pod. Cheap to clone.
#[derive(Clone)]
pub struct KasUrlQuerier {
    inner: Arc<Inner>,
}

/// A watch on one agent's lookup; the poller runs while one exists.
pub struct Watch {
    inner: Arc<Inner>,
    agent_id: i64,
    pub rx: watch::Receiver<Lookup>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut entries = self.inner.lock();
        if let Some(e) = entries.get_mut(&self.agent_id) {
            e.watchers = e.watchers.saturating_sub(1);
            if e.watchers == 0 {
                e.idle_since = Some(Instant::now());
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("too many agents are being looked up on this kas at once ({0})")]
pub struct TooManyAgents(pub usize);

impl KasUrlQuerier {
    /// `max_agents` bounds the agents polled or cached at once.
    pub fn new(redis: Arc<Redis>, max_agents: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                entries: Mutex::new(HashMap::new()),
                max_agents,
            }),
        }
    }

    /// Watches `agent_id`'s lookup: the cached answer at once, then each change. Starts the
    /// agent's poller if it is not running.
    pub fn watch(&self, agent_id: i64) -> Result<Watch, TooManyAgents> {
        let mut entries = self.inner.lock();
        if !entries.contains_key(&agent_id) && entries.len() >= self.inner.max_agents {
            let now = Instant::now();
            entries.retain(|_, e| {
                e.watchers > 0 || e.idle_since.is_some_and(|t| now - t < CACHE_PERIOD)
            });
            if entries.len() >= self.inner.max_agents {
                // Forget the longest-idle cached answer, if any.
                let oldest = entries
                    .iter()
                    .filter(|(_, e)| e.watchers == 0)
                    .min_by_key(|(_, e)| e.idle_since)
                    .map(|(id, _)| *id);
                match oldest {
                    Some(id) => {
                        entries.remove(&id);
                    }
                    None => return Err(TooManyAgents(self.inner.max_agents)),
                }
            }
        }
        let entry = entries.entry(agent_id).or_insert_with(|| Entry {
            tx: watch::channel(Lookup::Pending).0,
            watchers: 0,
            idle_since: None,
            polling: false,
        });
        entry.watchers += 1;
        entry.idle_since = None;
        let rx = entry.tx.subscribe();
        if !entry.polling {
            entry.polling = true;
            let tx = entry.tx.clone();
            tokio::spawn(poll(self.inner.clone(), agent_id, tx));
        }
        Ok(Watch {
            inner: self.inner.clone(),
            agent_id,
            rx,
        })
    }

    /// Agents with a poller or a cached answer (the table's size).
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One agent's poller: reads while anyone watches. Bounded by its watchers, who are
/// bounded by the routing timeout.
async fn poll(inner: Arc<Inner>, agent_id: i64, tx: watch::Sender<Lookup>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        {
            let mut entries = inner.lock();
            match entries.get_mut(&agent_id) {
                Some(e) if e.tx.same_channel(&tx) => {
                    if e.watchers == 0 {
                        e.polling = false;
                        return;
                    }
                }
                _ => return,
            }
        }
        let lookup = match kas_urls(&inner.redis, agent_id).await {
            Ok(mut urls) => {
                urls.sort();
                Lookup::Urls(urls.into())
            }
            Err(e) => {
                let last = match &*tx.borrow() {
                    Lookup::Urls(urls) => urls.clone(),
                    Lookup::Failed { last, .. } => last.clone(),
                    Lookup::Pending => Arc::from(Vec::new()),
                };
                Lookup::Failed {
                    error: e.to_string(),
                    last,
                }
            }
        };
        tx.send_if_modified(|old| {
            if *old == lookup {
                false
            } else {
                *old = lookup;
                true
            }
        });
    }
}
