//! The logs on disk, at start-up (before any shard runs, so plain
//! `std::fs` and threads): lock the data directory, find the current
//! generation, recover every shard's log in parallel, truncate torn tails,
//! quarantine what cannot be read, and rewrite the logs when the shard
//! count changed or something was lost.
//!
//! Layout: `DATA/LOCK`, `DATA/log-G/meta` (`shards = N`),
//! `DATA/log-G/shard-I/SEQ.wal` (SEQ: 16 hex digits), `DATA/quarantine/`.
//! A generation is complete once its `meta` exists: a rewrite builds
//! `log-G.tmp`, syncs it and renames it to `log-G`, then removes the older
//! generation, so a crash at any point leaves one complete generation.

use super::record::{self, Frame, Rec, HEADER, MAX_BODY};
use super::replay::{Image, Replay};
use super::snapshot::SnapWriter;
use crate::broker::home_shard;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use tracing::{error, info, warn};

/// Where a shard appends: its newest segment and its length.
#[derive(Debug, Clone)]
pub struct Tail {
    pub dir: PathBuf,
    pub seq: u64,
    pub len: u64,
    /// The segment's last bytes (up to 4 KiB): direct I/O rewrites the
    /// partial block they are in.
    pub last: Vec<u8>,
}

/// The last bytes (up to 4 KiB) of the first `len` bytes of a file.
fn last_bytes(path: &Path, len: u64) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let n = len.min(4096);
    let mut buf = vec![0u8; n as usize];
    let ok = File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(len - n))?;
            f.read_exact(&mut buf)
        })
        .is_ok();
    if ok {
        buf
    } else {
        Vec::new()
    }
}

impl Tail {
    pub fn path(&self) -> PathBuf {
        segment_path(&self.dir, self.seq)
    }
}

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

/// What start-up found, per shard of this run.
pub struct Opened {
    pub images: Vec<Image>,
    pub tails: Vec<Tail>,
    /// Segments moved to `quarantine/` and records skipped as corrupt.
    pub quarantined: u64,
    pub corrupt_records: u64,
    /// Held for the life of the process: the data directory's lock.
    pub lock: OwnedFd,
}

/// The records of one segment that can be trusted.
#[derive(Debug, Default)]
pub struct Scanned {
    pub recs: Vec<Rec>,
    /// Offset after the last good frame.
    pub good_len: usize,
    /// Frames that failed their checksum but were followed by a good one
    /// (skipped), and good frames whose body did not decode.
    pub corrupt: u64,
    /// The segment ends in bytes that are not a frame (a torn write, or
    /// corruption that could not be skipped).
    pub bad_tail: bool,
}

/// Scans a segment. A frame that fails its checksum is skipped if its
/// length leads to a good frame; otherwise the scan stops there.
pub fn scan(buf: &[u8]) -> Scanned {
    let mut recs = Vec::new();
    let mut s = scan_each(buf, |r| recs.push(r));
    s.recs = recs;
    s
}

/// Frees the segments' bytes once replayed (keeps their numbers).
fn loaded_bytes(loaded: &mut [(u64, Vec<u8>)]) -> usize {
    loaded
        .iter_mut()
        .map(|(_, b)| std::mem::take(b).len())
        .sum()
}

/// Whether a segment starts with a snapshot, and whether that snapshot
/// is complete (frames only: no record is decoded).
fn snapshot_state(buf: &[u8]) -> (bool, bool) {
    let mut at = 0;
    let mut first = true;
    let mut starts = false;
    while let Frame::Whole { ty, len, .. } = record::frame(&buf[at..]) {
        if first {
            starts = ty == record::T_SNAP_BEGIN;
            if !starts {
                return (false, false);
            }
            first = false;
        } else if ty == record::T_SNAP_END {
            return (true, true);
        }
        at += len;
    }
    (starts, false)
}

/// Scans a segment, handing each record to `f` as it is decoded.
pub fn scan_each(buf: &[u8], mut f: impl FnMut(Rec)) -> Scanned {
    let mut s = Scanned::default();
    let mut at = 0;
    while at < buf.len() {
        match record::frame(&buf[at..]) {
            Frame::Whole { ty, body, len } => {
                match record::decode(ty, body) {
                    Ok(rec) => f(rec),
                    Err(_) => s.corrupt += 1,
                }
                at += len;
                s.good_len = at;
            }
            Frame::Short => {
                s.bad_tail = true;
                break;
            }
            Frame::Bad => {
                let len =
                    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                let next = at + HEADER + len;
                let resync = len <= MAX_BODY
                    && next < buf.len()
                    && matches!(record::frame(&buf[next..]), Frame::Whole { .. });
                if !resync {
                    s.bad_tail = true;
                    break;
                }
                s.corrupt += 1;
                at = next;
            }
        }
    }
    s
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn lock(data: &Path) -> Result<OwnedFd, String> {
    let path = data.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(format!(
            "data directory {} is in use by another tarta process (or set a different --data-dir)",
            data.display()
        ));
    }
    Ok(OwnedFd::from(f))
}

fn generations(data: &Path) -> Result<Vec<(u64, usize)>, String> {
    let mut gens = Vec::new();
    let rd = fs::read_dir(data).map_err(|e| format!("cannot read {}: {e}", data.display()))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(g) = name.strip_prefix("log-") else {
            continue;
        };
        if g.ends_with(".tmp") {
            // An unfinished rewrite: the older generation is still whole.
            let _ = fs::remove_dir_all(e.path());
            continue;
        }
        let Ok(g) = g.parse::<u64>() else { continue };
        let meta = fs::read_to_string(e.path().join("meta")).unwrap_or_default();
        let shards = meta
            .lines()
            .find_map(|l| l.strip_prefix("shards = "))
            .and_then(|v| v.trim().parse::<usize>().ok());
        match shards {
            Some(n) if n > 0 => gens.push((g, n)),
            _ => {
                warn!(dir = %e.path().display(), "log generation without a valid meta file: ignored")
            }
        }
    }
    gens.sort();
    Ok(gens)
}

fn gen_dir(data: &Path, g: u64) -> PathBuf {
    data.join(format!("log-{g}"))
}

/// Opens (or creates) the logs for `n` shards and recovers their state.
pub fn open(data: &Path, n: usize, epoch_unix: u64) -> Result<Opened, String> {
    fs::create_dir_all(data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let lock = lock(data)?;
    let gens = generations(data)?;
    let Some(&(g, old_n)) = gens.last() else {
        let images: Vec<Image> = (0..n).map(|_| Image::default()).collect();
        let mut images = images;
        let tails = write_generation(data, 1, &mut images, epoch_unix)?;
        info!(dir = %data.display(), shards = n, "new data directory");
        return Ok(Opened {
            images,
            tails,
            quarantined: 0,
            corrupt_records: 0,
            lock,
        });
    };
    for (old, _) in &gens[..gens.len() - 1] {
        let _ = fs::remove_dir_all(gen_dir(data, *old));
    }
    let dir = gen_dir(data, g);
    let started = std::time::Instant::now();
    let results: Vec<Result<Recovered, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..old_n)
            .map(|i| {
                let d = dir.join(format!("shard-{i}"));
                let q = data.join("quarantine");
                s.spawn(move || recover_shard(&d, &q, g, i, epoch_unix))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("recovery thread panicked".into()))
            })
            .collect()
    });
    let mut recovered = Vec::with_capacity(old_n);
    for r in results {
        recovered.push(r?);
    }
    let quarantined: u64 = recovered.iter().map(|r| r.quarantined).sum();
    let corrupt: u64 = recovered.iter().map(|r| r.corrupt).sum();
    let sessions: usize = recovered.iter().map(|r| r.image.sessions.len()).sum();
    let retained: usize = recovered.iter().map(|r| r.image.retained.len()).sum();
    info!(
        generation = g,
        shards = old_n,
        sessions,
        retained,
        ms = started.elapsed().as_millis() as u64,
        "logs recovered"
    );
    if old_n == n && quarantined == 0 && corrupt == 0 {
        let (images, tails) = recovered.into_iter().map(|r| (r.image, r.tail)).unzip();
        return Ok(Opened {
            images,
            tails,
            quarantined,
            corrupt_records: corrupt,
            lock,
        });
    }
    // Re-home everything for `n` shards and write it as a new generation.
    if old_n != n {
        info!(
            from = old_n,
            to = n,
            "shard count changed: rewriting the logs"
        );
    } else {
        warn!("records were lost to corruption: rewriting the logs from what was recovered");
    }
    let mut images: Vec<Image> = (0..n).map(|_| Image::default()).collect();
    for r in recovered {
        let next_mid = r.image.next_mid;
        for s in r.image.sessions {
            images[home_shard(&s.session.client_id, n)].sessions.push(s);
        }
        for m in r.image.retained {
            images[home_shard(&m.topic, n)].retained.push(m);
        }
        // Any shard can route them; every shard may hold their queue entries.
        images[0].reroute.extend(r.image.reroute);
        for img in &mut images {
            img.seen.extend(r.image.seen.iter().copied());
        }
        for img in &mut images {
            img.next_mid = img.next_mid.max(next_mid);
        }
    }
    let tails = write_generation(data, g + 1, &mut images, epoch_unix)?;
    let _ = fs::remove_dir_all(&dir);
    Ok(Opened {
        images,
        tails,
        quarantined,
        corrupt_records: corrupt,
        lock,
    })
}

/// Creates a data directory holding `images` (one per shard, each homed
/// by `home_shard`): tools and benchmarks that need a large stored state.
pub fn create(data: &Path, images: &mut [Image], epoch_unix: u64) -> Result<(), String> {
    fs::create_dir_all(data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    if !generations(data)?.is_empty() {
        return Err(format!("{} already holds logs", data.display()));
    }
    write_generation(data, 1, images, epoch_unix).map(|_| ())
}

/// Writes generation `g`: one snapshot segment per shard, synced, then
/// made current by renaming its directory.
fn write_generation(
    data: &Path,
    g: u64,
    images: &mut [Image],
    epoch_unix: u64,
) -> Result<Vec<Tail>, String> {
    let err =
        |what: &str, p: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", p.display());
    let tmp = data.join(format!("log-{g}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    let mut tails = Vec::new();
    for (i, img) in images.iter_mut().enumerate() {
        let dir = tmp.join(format!("shard-{i}"));
        fs::create_dir_all(&dir).map_err(|e| err("create", &dir, e))?;
        let mut buf = Vec::new();
        let mut w = SnapWriter::begin(&mut buf, img.next_mid.max(1), epoch_unix);
        for (sid, s) in img.sessions.iter_mut().enumerate() {
            // Numbered afresh: the shard restores them at these numbers.
            s.sid = sid as u32;
            let will = s.will.as_ref().map(|(w, _)| w);
            w.session(
                sid as u32,
                &s.session,
                s.expiry,
                s.offline_at,
                will,
                s.username.as_ref(),
            );
        }
        for m in &img.retained {
            w.retained(m);
        }
        for m in &img.reroute {
            w.held(m);
        }
        w.end();
        let path = segment_path(&dir, 1);
        let mut f = File::create(&path).map_err(|e| err("create", &path, e))?;
        f.write_all(&buf).map_err(|e| err("write", &path, e))?;
        f.sync_all().map_err(|e| err("sync", &path, e))?;
        sync_dir(&dir).map_err(|e| err("sync", &dir, e))?;
        let last = buf[buf.len().saturating_sub(4096)..].to_vec();
        tails.push((i, buf.len() as u64, last));
    }
    let meta = tmp.join("meta");
    fs::write(&meta, format!("shards = {}\n", images.len())).map_err(|e| err("write", &meta, e))?;
    File::open(&meta)
        .and_then(|f| f.sync_all())
        .map_err(|e| err("sync", &meta, e))?;
    sync_dir(&tmp).map_err(|e| err("sync", &tmp, e))?;
    let dir = gen_dir(data, g);
    fs::rename(&tmp, &dir).map_err(|e| err("rename", &tmp, e))?;
    sync_dir(data).map_err(|e| err("sync", data, e))?;
    Ok(tails
        .into_iter()
        .map(|(i, len, last)| Tail {
            dir: dir.join(format!("shard-{i}")),
            seq: 1,
            len,
            last,
        })
        .collect())
}

struct Recovered {
    image: Image,
    tail: Tail,
    quarantined: u64,
    corrupt: u64,
}

fn segments(dir: &Path) -> Vec<u64> {
    let mut seqs: Vec<u64> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    u64::from_str_radix(name.strip_suffix(".wal")?, 16).ok()
                })
                .collect()
        })
        .unwrap_or_default();
    seqs.sort_unstable();
    seqs
}

fn quarantine(path: &Path, qdir: &Path, g: u64, shard: usize, seq: u64, why: &str) {
    let _ = fs::create_dir_all(qdir);
    let to = qdir.join(format!("log-{g}-shard-{shard}-{seq:016x}.wal"));
    match fs::rename(path, &to) {
        Ok(()) => {
            error!(segment = %path.display(), moved_to = %to.display(), "log segment quarantined: {why}")
        }
        Err(e) => {
            error!(segment = %path.display(), "log segment could not be quarantined ({e}): {why}")
        }
    }
}

/// Recovers one shard's log: replays from its newest complete snapshot.
fn recover_shard(
    dir: &Path,
    qdir: &Path,
    g: u64,
    shard: usize,
    epoch_unix: u64,
) -> Result<Recovered, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let seqs = segments(dir);
    let newest = seqs.last().copied();
    let mut quarantined = 0;
    let mut corrupt = 0;
    // Read the segments, newest first, down to a complete snapshot.
    let mut loaded: Vec<(u64, Vec<u8>)> = Vec::new();
    for &seq in seqs.iter().rev() {
        let path = segment_path(dir, seq);
        let mut bytes = Vec::new();
        if let Err(e) = File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)) {
            quarantine(&path, qdir, g, shard, seq, &format!("unreadable: {e}"));
            quarantined += 1;
            continue;
        }
        let (starts, complete) = snapshot_state(&bytes);
        if starts && !complete {
            // A compaction that did not finish: nothing was appended after
            // it, and the segments before it still hold everything.
            warn!(segment = %path.display(), "unfinished log snapshot removed");
            let _ = fs::remove_file(&path);
            continue;
        }
        loaded.push((seq, bytes));
        if complete {
            break;
        }
    }
    loaded.reverse();
    let base = loaded.first().map(|(seq, _)| *seq).unwrap_or(1);
    // Segments older than the snapshot are no longer needed.
    for &seq in seqs.iter().filter(|s| **s < base) {
        let _ = fs::remove_file(segment_path(dir, seq));
    }
    let mut replay = Replay::new(epoch_unix);
    for (seq, bytes) in &loaded {
        let path = segment_path(dir, *seq);
        let s = scan_each(bytes, |rec| replay.apply(rec));
        if s.bad_tail {
            let dropped = bytes.len() - s.good_len;
            // Zeros after the last record: space written ahead (runtime::wal).
            let padding = bytes[s.good_len..].iter().all(|b| *b == 0);
            if Some(*seq) == newest {
                if !padding {
                    warn!(segment = %path.display(), kept = s.good_len, dropped, "log tail torn (crash during a write): truncated at the last good record");
                }
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| {
                        f.set_len(s.good_len as u64)?;
                        f.sync_all()
                    })
                    .map_err(|e| format!("cannot truncate {}: {e}", path.display()))?;
            } else if !padding {
                // Not the segment being appended to: it was complete once.
                error!(segment = %path.display(), kept = s.good_len, dropped, "log segment corrupt: its records up to the damage are used");
                corrupt += 1;
            }
        }
        if s.corrupt > 0 {
            error!(segment = %path.display(), records = s.corrupt, "corrupt log records skipped");
            corrupt += s.corrupt;
        }
    }
    loaded_bytes(&mut loaded);
    let image = replay.finish();
    if image.orphans > 0 {
        warn!(
            shard,
            records = image.orphans,
            "log records referring to lost sessions or messages were ignored"
        );
    }
    if corrupt > 0 {
        // Keep a copy of what was damaged for inspection.
        for (seq, _) in &loaded {
            let p = segment_path(dir, *seq);
            let _ = fs::create_dir_all(qdir);
            let _ = fs::copy(
                &p,
                qdir.join(format!("log-{g}-shard-{shard}-{seq:016x}.wal")),
            );
        }
        quarantined += 1;
    }
    let tail = match loaded.last() {
        Some((seq, _)) => {
            let path = segment_path(dir, *seq);
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            Tail {
                dir: dir.to_path_buf(),
                seq: *seq,
                len,
                last: last_bytes(&path, len),
            }
        }
        None => Tail {
            dir: dir.to_path_buf(),
            seq: seqs.last().copied().unwrap_or(0) + 1,
            len: 0,
            last: Vec::new(),
        },
    };
    Ok(Recovered {
        image,
        tail,
        quarantined,
        corrupt,
    })
}
