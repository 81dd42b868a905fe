//! The spend spool: every call's spend event on local disk until the
//! control plane has applied it.
//!
//! Before a call is forwarded, its *reservation record* is appended: the
//! spend event the call would report if it never settled (cost = the
//! reservation, outcome `settled_at_reservation`), under the event id the
//! call will use. When the call settles, its real spend event is appended
//! under the same id. Appends go straight to the file (`write(2)`, no
//! buffering in the process), so a proxy killed with SIGKILL loses nothing
//! that was forwarded; `sync` makes them durable against a machine crash
//! too, and the delivery task calls it once per batch (fsync in groups).
//!
//! A refusal window's running count (see `refusals`) is recorded the same
//! way, as a reservation record: what the window reports if the run dies
//! before its minute is over. Each checkpoint of the window supersedes the
//! one before it, and the window's final event supersedes them all.
//!
//! On start, `recover` reads what a previous run left: each event id's last
//! record — the real event, or for a call cut off mid-flight the
//! reservation record (the last of them) — is delivered again. The control plane applies each
//! event id once, so a record delivered before the crash is not counted
//! twice. Segments roll over at `SEGMENT_BYTES` and are deleted once every
//! event with a record in them has been delivered.
//!
//! A spool also remembers the boot it was last opened in
//! (`/proc/sys/kernel/random/boot_id`) and the run that opened it (the mark
//! in that run's lease ids). When the previous run ran in the same boot,
//! every record it wrote is still here — `write(2)` reaches the kernel,
//! which a killed process cannot undo; only a machine crash loses unsynced
//! records — so what it spent is exactly what its records say, and the
//! leases it opened can be handed back once they are delivered
//! (`Recovered::previous_run`). Leases of runs before it are not: one of
//! them may have died with the machine.
//!
//! Record format: one tag byte (`R` reservation or checkpoint, `E` event,
//! `D` delivered: only the id) then the length-delimited protobuf `SpendEvent`. A torn last record (a write cut
//! off by the crash) ends the segment.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use keycap_proto::pb;
use prost::Message;

/// A segment rolls over once it is this large.
const SEGMENT_BYTES: u64 = 4 << 20;
const RESERVATION: u8 = b'R';
const EVENT: u8 = b'E';
/// The control plane applied the event with this id (only `event_id` set).
const DELIVERED: u8 = b'D';

/// What a previous run left undelivered.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Each undelivered event once, in the order first written.
    pub events: Vec<pb::SpendEvent>,
    /// Segments they came from; `Spool::forget_recovered` deletes them once
    /// the events are delivered.
    segments: Vec<PathBuf>,
    /// The run that used this spool last, if it did so in the current boot
    /// of this machine: none of its records can have been lost, so once
    /// these events are delivered the control plane knows all that run
    /// spent from the leases it opened.
    pub previous_run: Option<String>,
}

struct Segment {
    file: File,
    seq: u64,
    len: u64,
}

struct State {
    current: Segment,
    /// Segment sequence -> records in it whose event is not yet delivered.
    live: BTreeMap<u64, usize>,
    /// Event id -> the segments holding its reservation and event records.
    pending: HashMap<String, (Option<u64>, Option<u64>)>,
    /// Rolled-over segments not yet synced.
    unsynced: Vec<File>,
}

pub struct Spool {
    dir: PathBuf,
    state: Mutex<State>,
    /// Held for the spool's life: two proxies never share a directory.
    _lock: File,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("spend-{seq:020}.log"))
}

fn segment_seq(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("spend-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

impl Spool {
    /// Opens (creating) the spool in `dir` for the run marked `run`, takes
    /// its lock and reads what a previous run left there. New records go to
    /// a fresh segment.
    pub fn open(dir: &Path, run: &str) -> anyhow::Result<(Spool, Recovered)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating spool directory {}", dir.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("spool.lock"))
            .with_context(|| format!("opening {}", dir.join("spool.lock").display()))?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!(
                "spool directory {} is in use by another keycap-proxy",
                dir.display()
            )
        })?;
        let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| segment_seq(&p).map(|seq| (seq, p)))
            .collect();
        segments.sort();
        let mut recovered = recover(&segments)?;
        recovered.previous_run = previous_run_in_this_boot(dir, run)?;
        let next = segments.last().map_or(1, |(seq, _)| seq + 1);
        let spool = Spool {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                current: create_segment(dir, next)?,
                live: BTreeMap::from([(next, 0)]),
                pending: HashMap::new(),
                unsynced: Vec::new(),
            }),
            _lock: lock,
        };
        Ok((spool, recovered))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a call's reservation record: what it reports if it never
    /// settles. Must return before the call is forwarded. (A refusal
    /// window's checkpoint is written the same way, again under its id
    /// each time; the last one counts.)
    pub fn reserve(&self, at_reservation: &pb::SpendEvent) -> std::io::Result<()> {
        self.append(RESERVATION, at_reservation)
    }

    /// Appends a call's spend event.
    pub fn event(&self, event: &pb::SpendEvent) -> std::io::Result<()> {
        self.append(EVENT, event)
    }

    fn append(&self, tag: u8, event: &pb::SpendEvent) -> std::io::Result<()> {
        let mut record = Vec::with_capacity(1 + event.encoded_len() + 10);
        record.push(tag);
        event
            .encode_length_delimited(&mut record)
            .expect("a Vec grows");
        let mut st = self.state();
        if st.current.len >= SEGMENT_BYTES {
            let next = create_segment(&self.dir, st.current.seq + 1)?;
            st.live.entry(next.seq).or_insert(0);
            let old = std::mem::replace(&mut st.current, next);
            st.unsynced.push(old.file);
            remove_dead_segments(&mut st, &self.dir);
        }
        write_whole(&mut st.current, &record)?;
        let seq = st.current.seq;
        *st.live.entry(seq).or_default() += 1;
        let slots = st.pending.entry(event.event_id.clone()).or_default();
        let slot = if tag == RESERVATION {
            &mut slots.0
        } else {
            &mut slots.1
        };
        if let Some(earlier) = slot.replace(seq) {
            // Written again under one id (a refusal window's next
            // checkpoint; never a call's): the earlier record is
            // superseded.
            drop_record(&mut st, &self.dir, earlier);
        }
        Ok(())
    }

    /// Spend events recorded and not yet delivered (calls still in flight,
    /// with only their reservation recorded, are not counted).
    pub fn depth(&self) -> usize {
        self.state()
            .pending
            .values()
            .filter(|(_, event)| event.is_some())
            .count()
    }

    /// Makes every record appended so far durable (one fsync per file).
    pub fn sync(&self) -> std::io::Result<()> {
        let (current, unsynced) = {
            let mut st = self.state();
            (
                st.current.file.try_clone()?,
                std::mem::take(&mut st.unsynced),
            )
        };
        for f in unsynced {
            f.sync_data()?;
        }
        current.sync_data()
    }

    /// The control plane applied these events: their records are no longer
    /// needed, and segments left with none are deleted.
    pub fn delivered<'a>(&self, event_ids: impl IntoIterator<Item = &'a str>) {
        let mut st = self.state();
        let mut marks = Vec::new();
        for id in event_ids {
            if let Some((reservation, event)) = st.pending.remove(id) {
                for seq in [reservation, event].into_iter().flatten() {
                    drop_record(&mut st, &self.dir, seq);
                }
                marks.push(DELIVERED);
                pb::SpendEvent {
                    event_id: id.to_string(),
                    ..Default::default()
                }
                .encode_length_delimited(&mut marks)
                .expect("a Vec grows");
            }
        }
        // Spares a restart from sending these again (and from charging a
        // call that was never sent); segments go oldest first, so a mark
        // outlives the records it cancels.
        if !marks.is_empty() {
            if let Err(e) = write_whole(&mut st.current, &marks) {
                tracing::warn!(error = %e, "spool delivery marks not written");
            }
        }
    }

    /// Deletes the segments a previous run left, once their events are
    /// delivered.
    pub fn forget_recovered(&self, recovered: &Recovered) {
        for path in &recovered.segments {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "recovered spool segment not removed");
            }
        }
    }
}

/// Appends `bytes` whole or not at all: a failed write is cut back off, so
/// no torn record is left for later ones to follow (recovery stops at the
/// first torn record of a segment).
fn write_whole(segment: &mut Segment, bytes: &[u8]) -> std::io::Result<()> {
    if let Err(e) = segment.file.write_all(bytes) {
        if let Err(cut) = segment.file.set_len(segment.len) {
            tracing::error!(error = %cut, "spool segment not cut back after a failed write");
        }
        return Err(e);
    }
    segment.len += bytes.len() as u64;
    Ok(())
}

fn drop_record(st: &mut State, dir: &Path, seq: u64) {
    if let Some(n) = st.live.get_mut(&seq) {
        *n = n.saturating_sub(1);
    }
    remove_dead_segments(st, dir);
}

/// Deletes segments oldest first while they hold nothing undelivered, never
/// the current one: a newer segment may hold the delivery marks for an
/// older one's records, so it must not go first.
fn remove_dead_segments(st: &mut State, dir: &Path) {
    while let Some((&seq, &n)) = st.live.first_key_value() {
        if n > 0 || seq == st.current.seq {
            return;
        }
        st.live.remove(&seq);
        remove_segment(dir, seq);
    }
}

fn remove_segment(dir: &Path, seq: u64) {
    let path = segment_path(dir, seq);
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), error = %e, "spool segment not removed");
    }
}

fn create_segment(dir: &Path, seq: u64) -> std::io::Result<Segment> {
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, seq))?;
    // The new name must survive a crash too.
    File::open(dir)?.sync_all()?;
    Ok(Segment { file, seq, len: 0 })
}

/// This machine's boot, as Linux names it; `None` where it cannot be read.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The run that last opened the spool, if it did in this boot; records
/// this boot and `run` for the next one (each written whole, then renamed
/// into place).
fn previous_run_in_this_boot(dir: &Path, run: &str) -> anyhow::Result<Option<String>> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let (boot_before, run_before) = (read("boot_id"), read("run_id"));
    let Some(now) = boot_id() else {
        return Ok(None);
    };
    replace_file(dir, "boot_id", &now)?;
    replace_file(dir, "run_id", run)?;
    Ok(run_before.filter(|r| !r.is_empty() && boot_before.as_deref() == Some(now.as_str())))
}

/// Writes `text` to `dir/name` whole: to a temporary file, synced, then
/// renamed into place.
fn replace_file(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let (path, tmp) = (dir.join(name), dir.join(format!("{name}.tmp")));
    let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// The node id kept in the spool directory, made up (and kept) on first
/// use: a proxy started without `--node-id` keeps its id across restarts,
/// so a restart finds the leases its previous run held.
pub fn remembered_node_id(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating spool directory {}", dir.display()))?;
    if let Ok(id) = std::fs::read_to_string(dir.join("node_id")) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id = format!("proxy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    replace_file(dir, "node_id", &id)?;
    Ok(id)
}

/// Reads the segments a previous run left, oldest first: each event id's
/// last record wins, but a reservation record never wins over its real
/// event.
fn recover(segments: &[(u64, PathBuf)]) -> anyhow::Result<Recovered> {
    let mut order: Vec<String> = Vec::new();
    // Each id's record so far, and whether it is the real event.
    let mut last: HashMap<String, (pb::SpendEvent, bool)> = HashMap::new();
    for (_, path) in segments {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut rest = bytes.as_slice();
        while let Some((&tag, after)) = rest.split_first() {
            let mut cursor = after;
            let event = match (tag, pb::SpendEvent::decode_length_delimited(&mut cursor)) {
                (RESERVATION | EVENT | DELIVERED, Ok(event)) => event,
                _ => {
                    tracing::warn!(path = %path.display(), "spool segment ends in a torn record; the rest is skipped");
                    break;
                }
            };
            rest = cursor;
            if event.event_id.is_empty() {
                continue;
            }
            let id = event.event_id.clone();
            if tag == DELIVERED {
                last.remove(&id);
                continue;
            }
            match last.get(&id) {
                // A reservation record never overrides the real event.
                Some((_, true)) if tag == RESERVATION => {}
                Some(_) => {
                    last.insert(id, (event, tag == EVENT));
                }
                None => {
                    order.push(id.clone());
                    last.insert(id, (event, tag == EVENT));
                }
            }
        }
    }
    let events = order
        .into_iter()
        .filter_map(|id| last.remove(&id).map(|(event, _)| event))
        .collect();
    Ok(Recovered {
        events,
        segments: segments.iter().map(|(_, p)| p.clone()).collect(),
        previous_run: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, lease: &str, cost: i64, outcome: &str) -> pb::SpendEvent {
        pb::SpendEvent {
            event_id: id.to_string(),
            lease_id: lease.to_string(),
            key_id: "key_1".to_string(),
            cost_micros: cost,
            reserved_micros: 100,
            outcome: outcome.to_string(),
            ..Default::default()
        }
    }

    fn segments(dir: &Path) -> Vec<u64> {
        let mut s: Vec<u64> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| segment_seq(&e.unwrap().path()))
            .collect();
        s.sort();
        s
    }

    #[test]
    fn a_killed_run_leaves_each_undelivered_call_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, recovered) = Spool::open(dir.path(), "test-run").unwrap();
            assert!(recovered.events.is_empty());
            // Settled and delivered: gone.
            spool
                .reserve(&event("e1", "l1", 100, "settled_at_reservation"))
                .unwrap();
            spool.event(&event("e1", "l1", 40, "settled")).unwrap();
            // Settled, not delivered: its real event comes back.
            spool
                .reserve(&event("e2", "l1", 100, "settled_at_reservation"))
                .unwrap();
            spool.event(&event("e2", "l1", 70, "settled")).unwrap();
            // Forwarded, never settled: comes back at its reservation.
            spool
                .reserve(&event("e3", "l2", 100, "settled_at_reservation"))
                .unwrap();
            // Recorded, then never sent (the vendor could not be reached).
            spool
                .reserve(&event("e4", "l2", 100, "settled_at_reservation"))
                .unwrap();
            spool.delivered(["e1", "e4"]);
            spool.sync().unwrap();
            // Dropped without any shutdown, as SIGKILL would.
        }
        let (spool, recovered) = Spool::open(dir.path(), "test-run").unwrap();
        let got: Vec<(&str, i64, &str)> = recovered
            .events
            .iter()
            .map(|e| (e.event_id.as_str(), e.cost_micros, e.outcome.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![("e2", 70, "settled"), ("e3", 100, "settled_at_reservation")]
        );
        // Once delivered, the old segments go; the new run has its own.
        spool.forget_recovered(&recovered);
        assert_eq!(segments(dir.path()).len(), 1);
        drop(spool);
        let (_spool, recovered) = Spool::open(dir.path(), "test-run").unwrap();
        assert!(recovered.events.is_empty());
    }

    #[test]
    fn the_last_checkpoint_counts_and_never_over_the_real_event() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, _) = Spool::open(dir.path(), "test-run").unwrap();
            for cost in [1, 2] {
                spool
                    .reserve(&event("running", "", cost, "refused"))
                    .unwrap();
            }
            for cost in [1, 2] {
                spool
                    .reserve(&event("closed", "", cost, "refused"))
                    .unwrap();
            }
            spool.event(&event("closed", "", 3, "refused")).unwrap();
            spool.reserve(&event("closed", "", 4, "refused")).unwrap();
        }
        let (_spool, recovered) = Spool::open(dir.path(), "test-run").unwrap();
        let got: Vec<(&str, i64)> = recovered
            .events
            .iter()
            .map(|e| (e.event_id.as_str(), e.cost_micros))
            .collect();
        assert_eq!(got, vec![("running", 2), ("closed", 3)]);
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_what_precedes_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, _) = Spool::open(dir.path(), "test-run").unwrap();
            spool
                .reserve(&event("e1", "l1", 100, "settled_at_reservation"))
                .unwrap();
            spool.event(&event("e2", "l1", 5, "settled")).unwrap();
        }
        let seq = segments(dir.path())[0];
        let path = segment_path(dir.path(), seq);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let (_spool, recovered) = Spool::open(dir.path(), "test-run").unwrap();
        let ids: Vec<&str> = recovered
            .events
            .iter()
            .map(|e| e.event_id.as_str())
            .collect();
        assert_eq!(ids, vec!["e1"]);
    }

    #[test]
    fn depth_counts_events_not_yet_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), "test-run").unwrap();
        assert_eq!(spool.depth(), 0);
        for id in ["e1", "e2", "e3"] {
            spool.event(&event(id, "l1", 1, "settled")).unwrap();
        }
        assert_eq!(spool.depth(), 3);
        spool.delivered(["e1", "e3"]);
        assert_eq!(spool.depth(), 1);
    }

    #[test]
    fn delivered_segments_are_deleted_once_they_roll_over() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), "test-run").unwrap();
        let mut big = event("", "l1", 1, "settled");
        big.detail_json = "x".repeat(64 << 10);
        let n = (SEGMENT_BYTES / (64 << 10)) as usize + 8;
        for i in 0..n {
            big.event_id = format!("e{i}");
            spool.event(&big).unwrap();
        }
        assert!(segments(dir.path()).len() >= 2);
        // The first event stays undelivered: its segment stays.
        let ids: Vec<String> = (1..n).map(|i| format!("e{i}")).collect();
        spool.delivered(ids.iter().map(String::as_str));
        assert_eq!(segments(dir.path()).len(), 2);
        spool.delivered(["e0"]);
        assert_eq!(segments(dir.path()).len(), 1, "only the current segment");
    }

    #[test]
    fn a_delivery_mark_outlives_the_record_it_cancels() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, _) = Spool::open(dir.path(), "test-run").unwrap();
            // X was recorded and never sent; Y is still in flight and keeps
            // the first segment.
            spool
                .reserve(&event("x", "l1", 100, "settled_at_reservation"))
                .unwrap();
            spool
                .reserve(&event("y", "l1", 100, "settled_at_reservation"))
                .unwrap();
            let mut big = event("", "l1", 1, "settled");
            big.detail_json = "x".repeat(64 << 10);
            let per_segment = (SEGMENT_BYTES / (64 << 10)) as usize + 1;
            let mut fill = |from: usize| {
                let ids: Vec<String> = (from..from + per_segment)
                    .map(|i| format!("z{i}"))
                    .collect();
                for id in &ids {
                    big.event_id = id.clone();
                    spool.event(&big).unwrap();
                }
                spool.delivered(ids.iter().map(String::as_str));
            };
            fill(0);
            // X's mark lands in a later segment than X's record...
            spool.delivered(["x"]);
            // ...which then fills up, is all delivered and rolls over.
            fill(per_segment);
            fill(2 * per_segment);
        }
        let (_spool, recovered) = Spool::open(dir.path(), "test-run").unwrap();
        let ids: Vec<&str> = recovered
            .events
            .iter()
            .map(|e| e.event_id.as_str())
            .collect();
        assert_eq!(ids, vec!["y"], "a call never sent must not be charged");
    }

    #[test]
    fn only_the_last_run_in_this_boot_is_known_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (first, recovered) = Spool::open(dir.path(), "run1").unwrap();
        assert_eq!(recovered.previous_run, None, "no run before this one");
        drop(first);
        let (second, recovered) = Spool::open(dir.path(), "run2").unwrap();
        assert_eq!(recovered.previous_run.as_deref(), Some("run1"));
        drop(second);
        // The spool was last opened in another boot (the machine crashed
        // and came back): what that run wrote may not all be here.
        std::fs::write(dir.path().join("boot_id"), "another-boot").unwrap();
        let (third, recovered) = Spool::open(dir.path(), "run3").unwrap();
        assert_eq!(recovered.previous_run, None);
        drop(third);
        // The run after it is known whole, and only it: run2's leases
        // (before the crash) are not named.
        let (_fourth, recovered) = Spool::open(dir.path(), "run4").unwrap();
        assert_eq!(recovered.previous_run.as_deref(), Some("run3"));
    }

    #[test]
    fn a_node_id_made_up_for_a_spool_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = remembered_node_id(dir.path()).unwrap();
        assert!(id.starts_with("proxy-"), "{id}");
        assert_eq!(remembered_node_id(dir.path()).unwrap(), id);
    }

    #[test]
    fn two_proxies_never_share_a_spool() {
        let dir = tempfile::tempdir().unwrap();
        let (_first, _) = Spool::open(dir.path(), "test-run").unwrap();
        let err = Spool::open(dir.path(), "test-run")
            .err()
            .expect("second open refused");
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
