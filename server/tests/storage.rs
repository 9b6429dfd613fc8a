//! Tests of the replica's redb storage (`synod_server::storage`). Round
//! trips: batches persisted, then the database reopened, must give exactly
//! the `DurableState` that `DurableState::apply` gives for the same batches
//! (by hand, and as a proptest of random batch sequences with reopens), and
//! the state tables exactly the records the state deltas and installed
//! snapshots left (staging over several commits, deltas meanwhile). Every
//! commit of the crash workload mixes batches and state writes, as the
//! replica's writer does.
//! Refusals: a wrong cluster or node id, another format version, a damaged
//! record, inconsistent meta, a file that is not a database, and a database
//! already open are each refused with an error naming the file. Crash
//! images: a redb `StorageBackend` records which bytes were written and which
//! were synced; during a seeded workload, at every sync (and at random writes
//! between) it takes the image a crash would leave (the synced bytes, plus
//! none, a prefix with a torn last write, or a random subset of the unsynced
//! writes), and each image must reopen to exactly the state before or after
//! the call in flight, so every acknowledged call survives and none is
//! half-applied; now and then the workload restarts from such an image and
//! carries on. The seed is printed; `SYNOD_STORAGE_SEED=<seed>` replays a run
//! and `SYNOD_STORAGE_CALLS=<n>` makes it longer. Fail-stop: a failed `fsync`
//! or write makes the call fail and poisons the storage for good. Damage:
//! single flipped bits anywhere in a database are refused or harmless, and
//! never cause a panic.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use redb::backends::InMemoryBackend;
use redb::{ReadableDatabase, ReadableTable, StorageBackend, TableDefinition, TableHandle};
use synod_paxos::{
    AcceptedEntry, Ballot, Batch, ChosenEntry, Command, DurableState, Membership, Persist, Slot,
    Value,
};
use synod_server::storage::{
    DatabasePaths, Identity, Recovered, SavedStateHeader, StateDelta, StateTable, StateWrite,
    Storage, StorageError, Write,
};

// ---------------------------------------------------------------------------
// Helpers shared by the tests.

fn identity() -> Identity {
    Identity {
        cluster_id: "test-cluster".to_string(),
        node_id: 2,
    }
}

fn members(ids: &[u64]) -> Membership {
    Membership::new(ids).expect("valid membership")
}

fn commands(payload: &[u8]) -> Value {
    Value::Commands(Batch {
        stamp_ms: payload.len() as u64,
        commands: vec![Command::copy_from_slice(payload)].into(),
    })
}

/// The records of a saved state, as the storage must give them back.
type Records = BTreeMap<(StateTable, Vec<u8>), Vec<u8>>;

/// A saved state: its header and records.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SavedState {
    header: SavedStateHeader,
    records: Records,
}

/// The reference: what the storage must hold after the calls so far.
#[derive(Clone, Debug)]
struct Model {
    durable: DurableState,
    state: Option<SavedState>,
    /// Records staged for an install, if one is under way (lost on reopen,
    /// never read back).
    staging: Option<Records>,
}

impl Model {
    fn new() -> Model {
        Model {
            durable: DurableState::bootstrap(members(&[1, 2, 3])),
            state: None,
            staging: None,
        }
    }

    /// Whether reopened databases hold this model's durable state and
    /// saved state.
    fn matches(&self, storage: &Storage, recovered: &Recovered) -> bool {
        matches_parts(self, self, storage, recovered)
    }

    fn state_through(&self) -> Option<Slot> {
        self.state.as_ref().map(|state| state.header.through)
    }

    fn apply(&mut self, write: &Write) {
        match write {
            Write::Persist(batch) => self.durable.apply(batch),
            Write::State(StateWrite::Delta(delta)) => {
                let Some(header) = &delta.header else {
                    return;
                };
                let state = self.state.get_or_insert_with(|| SavedState {
                    header: header.clone(),
                    records: Records::new(),
                });
                state.header = header.clone();
                for ((table, key), value) in &delta.changes {
                    let key = (*table, key.to_vec());
                    match value {
                        Some(value) => {
                            state.records.insert(key, value.clone());
                        }
                        None => {
                            state.records.remove(&key);
                        }
                    }
                }
            }
            Write::State(StateWrite::StageBegin) => self.staging = Some(Records::new()),
            Write::State(StateWrite::Stage(records)) => {
                let staging = self.staging.as_mut().expect("staging began");
                for (table, key, value) in records {
                    staging.insert((*table, key.to_vec()), value.clone());
                }
            }
            Write::State(StateWrite::StageActivate(header)) => {
                self.state = Some(SavedState {
                    header: header.clone(),
                    records: self.staging.take().expect("staging began"),
                });
            }
        }
    }
}

/// Whether reopened databases hold the log of `log` and the saved state
/// of `state` (two models when a crash came between the two databases'
/// commits of one call). The log recovered is the one `log` holds, less
/// what a saved state past its chosen prefix covers (durability case 4).
fn matches_parts(log: &Model, state: &Model, storage: &Storage, recovered: &Recovered) -> bool {
    recovered.durable == expected_durable(&log.durable, state.state_through())
        && recovered.state == state.state.as_ref().map(|state| state.header.clone())
        && read_records(storage).ok()
            == Some(
                state
                    .state
                    .as_ref()
                    .map(|state| state.records.clone())
                    .unwrap_or_default(),
            )
}

/// The durable state a restart gives for the log `durable` next to a
/// saved state through `state_through`: a saved state past the log's
/// chosen prefix covers the log at or below it.
fn expected_durable(durable: &DurableState, state_through: Option<Slot>) -> DurableState {
    let mut expected = durable.clone();
    if let Some(through) = state_through.filter(|&through| through > durable.chosen_through) {
        expected.log = expected.log.split_off(&(through + 1));
        expected.log_start = through + 1;
        expected.chosen_through = through;
    }
    expected
}

/// Every record of the saved state, in order.
fn read_records(storage: &Storage) -> Result<Records, StorageError> {
    let mut records = Records::new();
    let mut last: Option<(StateTable, Vec<u8>)> = None;
    let mut in_order = true;
    storage.read_state(&mut |record| {
        let key = (record.table, record.key.to_vec());
        in_order &= last.as_ref().is_none_or(|last| *last < key);
        last = Some(key.clone());
        records.insert(key, record.value.to_vec());
        Ok(())
    })?;
    assert!(in_order, "records come in table then key order");
    Ok(records)
}

/// One call on the storage: one commit.
#[derive(Clone, Debug)]
struct Call(Vec<Write>);

impl Call {
    fn persist(batches: Vec<Persist>) -> Call {
        Call(batches.into_iter().map(Write::Persist).collect())
    }

    fn apply(&self, model: &mut Model) {
        for write in &self.0 {
            model.apply(write);
        }
    }

    fn run(&self, storage: &mut Storage) -> Result<(), StorageError> {
        storage.commit(&self.0)
    }

    /// Whether the call must be synced before it returns: it changes the
    /// log or the saved state. Staging alone is not synced (the
    /// activation's commit makes the staging durable), nor are empty
    /// batches.
    fn must_sync(&self) -> bool {
        self.0.iter().any(|write| match write {
            Write::Persist(batch) => !batch.is_empty(),
            Write::State(StateWrite::Delta(delta)) => !delta.is_empty(),
            Write::State(StateWrite::StageActivate(_)) => true,
            Write::State(StateWrite::StageBegin | StateWrite::Stage(_)) => false,
        })
    }
}

/// Makes a batch legal for the storage: compaction only below the saved
/// state (the storage refuses anything else, as tested separately).
fn legalize(batch: &mut Persist, model: &Model) {
    if let Some(below) = batch.compact_below {
        let limit = model.state_through().map_or(0, |through| through + 1);
        batch.compact_below = Some(below.min(limit));
    }
}

/// Clamps a saved state's slot so that it leaves no gap before the log
/// start and never goes back.
fn legal_through(through: Slot, model: &Model) -> Slot {
    through
        .max(model.durable.log_start.saturating_sub(1))
        .max(model.state_through().unwrap_or(0))
}

/// A header through `through` with some scalars.
fn header(through: Slot, model: &Model, scalars: &[u8]) -> SavedStateHeader {
    SavedStateHeader {
        through,
        membership: model.durable.membership.clone(),
        scalars: scalars.to_vec(),
    }
}

/// A key in a small space, so that writes overwrite and removes hit.
fn state_key(rng: &mut ChaCha8Rng) -> (StateTable, Box<[u8]>) {
    let table = StateTable::ALL[rng.random_range(0..StateTable::ALL.len())];
    let key = match table {
        StateTable::Sessions => rng.random_range(0u64..40).to_be_bytes().to_vec(),
        _ => format!("/k/{:03}", rng.random_range(0..120)).into_bytes(),
    };
    (table, key.into_boxed_slice())
}

fn state_value(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let length = if rng.random_bool(0.05) {
        rng.random_range(0..60_000)
    } else {
        rng.random_range(0..300)
    };
    (0..length).map(|_| rng.random()).collect()
}

/// A random state write legal after `model`.
fn random_state_write(rng: &mut ChaCha8Rng, model: &Model) -> Write {
    let applied = model.durable.chosen_through;
    let through = legal_through(rng.random_range(0..=applied.max(1)), model);
    let write = match (model.staging.is_some(), rng.random_range(0..10)) {
        (false, 0) => StateWrite::StageBegin,
        (true, 0..=2) => StateWrite::Stage(
            (0..rng.random_range(0..40))
                .map(|_| {
                    let (table, key) = state_key(rng);
                    (table, key, state_value(rng))
                })
                .collect(),
        ),
        (true, 3) => StateWrite::StageActivate(header(through, model, b"installed")),
        _ => {
            let changes = (0..rng.random_range(0..30))
                .map(|_| {
                    let value = (!rng.random_bool(0.25)).then(|| state_value(rng));
                    (state_key(rng), value)
                })
                .collect();
            StateWrite::Delta(StateDelta {
                header: Some(header(through, model, &through.to_le_bytes())),
                changes,
            })
        }
    };
    Write::State(write)
}

/// The names two in-memory databases go by in errors.
fn memory_paths(name: &str) -> DatabasePaths {
    DatabasePaths {
        log: name.into(),
        state: format!("{name}-state").into(),
        journal: format!("{name}-journal").into(),
    }
}

fn memory_backend(bytes: &[u8]) -> InMemoryBackend {
    let backend = InMemoryBackend::new();
    backend
        .set_len(bytes.len() as u64)
        .expect("in-memory set_len");
    backend.write(0, bytes).expect("in-memory write");
    backend
}

/// Opens the images of a log and a state database.
fn open_image(images: &[Vec<u8>; FILES], name: &str) -> Result<(Storage, Recovered), StorageError> {
    Storage::open_with_backends(
        memory_backend(&images[LOG_FILE]),
        memory_backend(&images[STATE_FILE]),
        memory_backend(&images[JOURNAL_FILE]),
        &memory_paths(name),
        &identity(),
    )
}

/// A fresh pair of in-memory databases.
fn create_in_memory(state: &DurableState) -> Storage {
    Storage::create_with_backends(
        InMemoryBackend::new(),
        InMemoryBackend::new(),
        InMemoryBackend::new(),
        &memory_paths("memory"),
        identity(),
        state,
    )
    .expect("create")
}

// ---------------------------------------------------------------------------
// A backend that remembers what was written and what was synced.

/// One write to the backend, kept until the next sync.
#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

fn apply_op(image: &mut Vec<u8>, op: &Op, torn_at: Option<usize>) {
    match op {
        Op::Write { offset, data } => {
            let offset = usize::try_from(*offset).expect("offset fits");
            let data = &data[..torn_at.unwrap_or(data.len()).min(data.len())];
            if image.len() < offset + data.len() {
                image.resize(offset + data.len(), 0);
            }
            image[offset..offset + data.len()].copy_from_slice(data);
        }
        Op::SetLen(len) => image.resize(usize::try_from(*len).expect("length fits"), 0),
    }
}

/// Which of a replica's three files a disk holds.
const LOG_FILE: usize = 0;
const STATE_FILE: usize = 1;
const JOURNAL_FILE: usize = 2;
const FILES: usize = 3;

/// A crash image of both files and how it was made.
struct CrashImage {
    bytes: [Vec<u8>; FILES],
    how: &'static str,
}

#[derive(Default)]
struct Disk {
    /// What reads see: every write applied.
    live: Vec<u8>,
    /// What survives a crash for sure: the bytes as of the last completed sync.
    durable: Vec<u8>,
    /// Writes since the last sync, in order; any of them may or may not
    /// have reached the disk before a crash.
    pending: Vec<Op>,
    syncs: u64,
    /// Makes every `sync_data` fail while set.
    fail_syncs: bool,
    /// Makes every `write` fail while set.
    fail_writes: bool,
}

impl Disk {
    /// What a crash now could leave of this file: the synced bytes and a
    /// random subset of the unsynced writes, in order.
    fn crashed(&self, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let mut image = self.durable.clone();
        for op in &self.pending {
            if rng.random_bool(0.5) {
                apply_op(&mut image, op, None);
            }
        }
        image
    }
}

/// The two files of one replica, on disks that crash together.
#[derive(Default)]
struct Disks {
    files: [Disk; FILES],
    /// Crash images are taken only while this is set.
    recording: Option<ChaCha8Rng>,
    images: Vec<CrashImage>,
}

impl Disks {
    /// Records an image: `file` as given, the other as a crash now could
    /// leave it.
    fn record(&mut self, file: usize, bytes: Vec<u8>, how: &'static str) {
        let Some(rng) = self.recording.as_mut() else {
            return;
        };
        let mut images: [Vec<u8>; FILES] = Default::default();
        for (index, image) in images.iter_mut().enumerate() {
            if index != file {
                *image = self.files[index].crashed(rng);
            }
        }
        images[file] = bytes;
        self.images.push(CrashImage { bytes: images, how });
    }

    fn capture_between_syncs(&mut self, file: usize) {
        let mut image = self.files[file].durable.clone();
        for op in &self.files[file].pending {
            apply_op(&mut image, op, None);
        }
        self.record(
            file,
            image,
            "synced bytes plus every write so far (a crash between syncs)",
        );
    }

    /// The images a crash during this sync of `file` could leave.
    fn capture_during_sync(&mut self, file: usize) {
        let Some(rng) = self.recording.as_mut() else {
            return;
        };
        let disk = &self.files[file];
        let count = disk.pending.len();
        // A prefix of the unsynced writes, the last of them torn.
        let kept = rng.random_range(0..=count);
        let mut prefix = disk.durable.clone();
        for (index, op) in disk.pending[..kept].iter().enumerate() {
            let torn_at = match op {
                Op::Write { data, .. } if index + 1 == kept && !data.is_empty() => {
                    Some(rng.random_range(0..data.len()))
                }
                _ => None,
            };
            apply_op(&mut prefix, op, torn_at);
        }
        // Any subset, in order (the disk may reorder writes until the sync).
        let subset = disk.crashed(rng);
        self.record(
            file,
            prefix,
            "synced bytes plus a prefix of the unsynced writes, the last one torn",
        );
        self.record(
            file,
            subset,
            "synced bytes plus a random subset of the unsynced writes",
        );
    }
}

/// A redb backend over shared memory that tracks written versus synced
/// bytes: one of the two files of a [`CrashPair`].
#[derive(Clone)]
struct CrashBackend {
    disks: Arc<Mutex<Disks>>,
    file: usize,
}

// By hand: a derived impl would print every byte of the disk.
impl std::fmt::Debug for CrashBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let disks = self.disks();
        let disk = &disks.files[self.file];
        f.debug_struct("CrashBackend")
            .field("file", &self.file)
            .field("live_bytes", &disk.live.len())
            .field("durable_bytes", &disk.durable.len())
            .field("pending_ops", &disk.pending.len())
            .field("syncs", &disk.syncs)
            .finish()
    }
}

impl CrashBackend {
    fn disks(&self) -> MutexGuard<'_, Disks> {
        // A panic elsewhere in a test poisons the lock; the bytes stay usable.
        self.disks
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The log, state and journal files of one replica, on [`CrashBackend`]s
/// that share their crash images.
#[derive(Clone, Debug)]
struct CrashPair {
    log: CrashBackend,
    state: CrashBackend,
    journal: CrashBackend,
}

impl CrashPair {
    fn new() -> CrashPair {
        let disks = Arc::new(Mutex::new(Disks::default()));
        CrashPair {
            log: CrashBackend {
                disks: disks.clone(),
                file: LOG_FILE,
            },
            state: CrashBackend {
                disks: disks.clone(),
                file: STATE_FILE,
            },
            journal: CrashBackend {
                disks,
                file: JOURNAL_FILE,
            },
        }
    }

    /// Files whose disks hold `images`, all of them synced.
    fn from_images(images: [Vec<u8>; FILES]) -> CrashPair {
        let pair = CrashPair::new();
        {
            let mut disks = pair.disks();
            for (disk, image) in disks.files.iter_mut().zip(images) {
                disk.live = image.clone();
                disk.durable = image;
            }
        }
        pair
    }

    fn disks(&self) -> MutexGuard<'_, Disks> {
        self.log.disks()
    }

    fn create(&self, state: &DurableState) -> Storage {
        Storage::create_with_backends(
            self.log.clone(),
            self.state.clone(),
            self.journal.clone(),
            &memory_paths("memory"),
            identity(),
            state,
        )
        .expect("create")
    }

    fn open(&self) -> Result<(Storage, Recovered), StorageError> {
        Storage::open_with_backends(
            self.log.clone(),
            self.state.clone(),
            self.journal.clone(),
            &memory_paths("memory"),
            &identity(),
        )
    }

    fn durable_images(&self) -> [Vec<u8>; FILES] {
        let disks = self.disks();
        std::array::from_fn(|file| disks.files[file].durable.clone())
    }

    fn live_images(&self) -> [Vec<u8>; FILES] {
        let disks = self.disks();
        std::array::from_fn(|file| disks.files[file].live.clone())
    }

    fn take_images(&self) -> Vec<CrashImage> {
        std::mem::take(&mut self.disks().images)
    }

    /// The state file's length as reads see it.
    fn state_length(&self) -> usize {
        self.disks().files[STATE_FILE].live.len()
    }

    /// Syncs of both files so far.
    fn syncs(&self) -> u64 {
        let disks = self.disks();
        disks.files.iter().map(|disk| disk.syncs).sum()
    }

    /// Makes every sync of both files fail, or succeed again.
    fn fail_syncs(&self, fail: bool) {
        for disk in &mut self.disks().files {
            disk.fail_syncs = fail;
        }
    }

    /// Makes every write to both files fail, or succeed again.
    fn fail_writes(&self, fail: bool) {
        for disk in &mut self.disks().files {
            disk.fail_writes = fail;
        }
    }
}

impl StorageBackend for CrashBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.disks().files[self.file].live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let disks = self.disks();
        let offset = usize::try_from(offset).map_err(|_| ErrorKind::InvalidInput)?;
        let source = disks.files[self.file]
            .live
            .get(offset..offset + out.len())
            .ok_or(ErrorKind::UnexpectedEof)?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut disks = self.disks();
        let disk = &mut disks.files[self.file];
        let op = Op::SetLen(len);
        apply_op(&mut disk.live, &op, None);
        disk.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut disks = self.disks();
        disks.files[self.file].syncs += 1;
        if disks.files[self.file].fail_syncs {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        disks.capture_during_sync(self.file);
        let disk = &mut disks.files[self.file];
        disk.durable = disk.live.clone();
        disk.pending.clear();
        let image = disk.durable.clone();
        disks.record(
            self.file,
            image,
            "the bytes just synced (a crash right after the sync)",
        );
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut disks = self.disks();
        if disks.files[self.file].fail_writes {
            return Err(std::io::Error::other("injected write failure"));
        }
        let op = Op::Write {
            offset,
            data: data.to_vec(),
        };
        let disk = &mut disks.files[self.file];
        apply_op(&mut disk.live, &op, None);
        disk.pending.push(op);
        let between = match disks.recording.as_mut() {
            Some(rng) => rng.random_bool(0.02),
            None => false,
        };
        if between {
            disks.capture_between_syncs(self.file);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// 1. Round trips.

/// A hand-written sequence touching every field of a batch.
fn scripted_calls() -> Vec<Call> {
    let ballot = |round, node| Ballot::new(round, node);
    let accept = |slot, round, payload: &[u8]| AcceptedEntry {
        slot,
        ballot: Ballot::new(round, 1),
        value: commands(payload),
    };
    vec![
        Call::persist(vec![Persist {
            id: 1,
            promised: Some(ballot(1, 1)),
            ..Persist::default()
        }]),
        Call::persist(vec![
            Persist {
                id: 2,
                accepted: vec![accept(1, 1, b"a"), accept(2, 1, b"b"), accept(3, 1, b"c")],
                ..Persist::default()
            },
            Persist {
                id: 3,
                // A lower promise never lowers the stored one.
                promised: Some(ballot(0, 3)),
                chosen_through: Some(2),
                learned: vec![ChosenEntry {
                    slot: 4,
                    value: Value::Noop,
                }],
                ..Persist::default()
            },
        ]),
        Call::persist(vec![Persist {
            id: 4,
            promised: Some(ballot(2, 3)),
            // Replaces slot 3's record.
            accepted: vec![AcceptedEntry {
                slot: 3,
                ballot: ballot(2, 3),
                value: commands(b"c2"),
            }],
            // A lower chosen prefix never lowers the stored one.
            chosen_through: Some(1),
            ..Persist::default()
        }]),
        Call(vec![Write::State(StateWrite::Delta(StateDelta {
            header: Some(SavedStateHeader {
                through: 2,
                membership: members(&[1, 2, 3]),
                scalars: b"state machine through slot 2".to_vec(),
            }),
            changes: [
                (
                    (StateTable::Nodes, Box::from(&b"/"[..])),
                    Some(b"root".to_vec()),
                ),
                (
                    (StateTable::Nodes, Box::from(&b"/a"[..])),
                    Some(b"a".to_vec()),
                ),
                (
                    (StateTable::Sessions, Box::from(&7u64.to_be_bytes()[..])),
                    Some(vec![7]),
                ),
                // Removing what is not there is harmless.
                ((StateTable::Locks, Box::from(&b"/lock"[..])), None),
            ]
            .into_iter()
            .collect(),
        }))]),
        Call::persist(vec![Persist {
            id: 5,
            chosen_through: Some(4),
            compact_below: Some(2),
            ..Persist::default()
        }]),
        Call::persist(vec![
            Persist {
                id: 6,
                // Below the log start: ignored, as `DurableState::apply` does.
                accepted: vec![accept(1, 2, b"late"), accept(5, 2, b"e")],
                ..Persist::default()
            },
            Persist {
                id: 7,
                compact_below: Some(3),
                membership: Some(members(&[2, 3, 4])),
                ..Persist::default()
            },
        ]),
        // An empty batch is acknowledged without a commit.
        Call::persist(vec![Persist {
            id: 8,
            ..Persist::default()
        }]),
    ]
}

#[test]
fn persisted_batches_reopen_as_durable_state_apply_leaves_them() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let paths = DatabasePaths::in_dir(directory.path());
    let mut model = Model::new();
    let mut storage =
        Storage::create(&paths, identity(), &model.durable).expect("create the databases");
    assert_eq!(storage.path(), paths.log.as_path());
    assert_eq!(storage.state_path(), paths.state.as_path());
    assert_eq!(storage.identity(), &identity());
    for call in scripted_calls() {
        call.run(&mut storage).expect("call succeeds");
        call.apply(&mut model);
    }
    assert_eq!(
        Some(read_records(&storage).expect("read the state")),
        model.state.as_ref().map(|state| state.records.clone())
    );
    assert_eq!(storage.state_through(), Some(2));
    storage.close().expect("close");

    let (storage, recovered) = Storage::open(&paths, &identity()).expect("reopen");
    assert!(model.matches(&storage, &recovered));
    assert_eq!(read_records(&storage).expect("records").len(), 3);
    // The state is one a core can restart from, after the saved state.
    let through = model.state_through().unwrap_or(0);
    recovered
        .durable
        .check(through + 1)
        .expect("restartable state");
    assert_eq!(recovered.durable.log_start, 3);
    assert_eq!(recovered.durable.membership, members(&[2, 3, 4]));
    assert_eq!(recovered.durable.promised, Ballot::new(2, 3));
    assert_eq!(recovered.durable.chosen_through, 4);
    drop(storage);

    // Creating over an existing database is refused, and so is creating
    // next to a state database left alone (nothing is overwritten).
    let error =
        Storage::create(&paths, identity(), &Model::new().durable).expect_err("the file exists");
    assert!(
        matches!(error, StorageError::AlreadyExists { .. }),
        "{error}"
    );
    assert_mentions_path(&error, &paths.log);
    std::fs::remove_file(&paths.log).expect("remove the log database");
    let error = Storage::create(&paths, identity(), &Model::new().durable)
        .expect_err("the state file exists");
    assert!(
        matches!(error, StorageError::AlreadyExists { .. }),
        "{error}"
    );
    assert_mentions_path(&error, &paths.state);
    assert!(
        !paths.log.exists(),
        "a refused create leaves no log database behind"
    );
}

#[test]
fn deltas_and_installed_states_round_trip_and_replace_each_other() {
    let backend = CrashPair::new();
    let mut model = Model::new();
    let mut storage = backend.create(&model.durable);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let big = |rng: &mut ChaCha8Rng, length: usize| -> Vec<u8> {
        (0..length).map(|_| rng.random()).collect()
    };
    let mut calls = Vec::new();
    // A delta, one that overwrites and removes, and values of many pages.
    for (through, keys) in [(0u64, 0..50u32), (5, 25..80)] {
        let changes = keys
            .map(|index| {
                let key = (
                    StateTable::Nodes,
                    Box::from(format!("/n/{index:04}").as_bytes()),
                );
                let value =
                    (index % 7 != 3).then(|| big(&mut rng, (index as usize * 997) % 70_000));
                (key, value)
            })
            .collect();
        calls.push(Call(vec![Write::State(StateWrite::Delta(StateDelta {
            header: Some(header(through, &model, b"delta")),
            changes,
        }))]));
    }
    // An install over several commits, deltas to the live state meanwhile,
    // then the installed state replaces it whole.
    calls.push(Call(vec![Write::State(StateWrite::StageBegin)]));
    for part in 0..3u32 {
        let records = (0..40u32)
            .map(|index| {
                let key = format!("/s/{:04}", part * 40 + index);
                (
                    StateTable::Locks,
                    Box::from(key.as_bytes()),
                    big(&mut rng, 3_000),
                )
            })
            .collect();
        calls.push(Call(vec![Write::State(StateWrite::Stage(records))]));
        calls.push(Call(vec![Write::State(StateWrite::Delta(StateDelta {
            header: Some(header(6 + u64::from(part), &model, b"meanwhile")),
            changes: [(
                (StateTable::Sessions, Box::from(&[part as u8; 8][..])),
                Some(vec![1]),
            )]
            .into_iter()
            .collect(),
        }))]));
    }
    calls.push(Call(vec![Write::State(StateWrite::StageActivate(header(
        12,
        &model,
        b"installed",
    )))]));
    // Deltas go on against the installed state.
    calls.push(Call(vec![Write::State(StateWrite::Delta(StateDelta {
        header: Some(header(13, &model, b"after")),
        changes: [((StateTable::Locks, Box::from(&b"/s/0000"[..])), None)]
            .into_iter()
            .collect(),
    }))]));
    for call in calls {
        call.run(&mut storage).expect("commit");
        call.apply(&mut model);
        assert_eq!(
            read_records(&storage).ok(),
            model.state.as_ref().map(|state| state.records.clone())
        );
    }
    let records = &model.state.as_ref().expect("a state").records;
    assert_eq!(records.len(), 119, "the installed state, less one removed");
    assert!(records.keys().all(|(table, _)| *table == StateTable::Locks));
    drop(storage);
    let (storage, recovered) = open_image(&backend.live_images(), "reopened").expect("reopen");
    assert!(model.matches(&storage, &recovered));
}

fn ballot_strategy() -> impl Strategy<Value = Ballot> {
    (0u64..6, 1u64..4).prop_map(|(round, node)| Ballot::new(round, node))
}

fn value_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Noop),
        (
            any::<u64>(),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 1..4)
        )
            .prop_map(|(stamp_ms, commands)| Value::Commands(Batch {
                stamp_ms,
                commands: commands
                    .into_iter()
                    .map(Command::from)
                    .collect::<Vec<_>>()
                    .into(),
            })),
        membership_strategy().prop_map(|membership| membership.to_value()),
    ]
}

fn membership_strategy() -> impl Strategy<Value = Membership> {
    proptest::sample::subsequence(vec![1u64, 2, 3, 4, 5], 1..=5).prop_map(|ids| members(&ids))
}

fn batch_strategy() -> impl Strategy<Value = Persist> {
    (
        proptest::option::of(ballot_strategy()),
        proptest::collection::vec((0u64..32, ballot_strategy(), value_strategy()), 0..5),
        proptest::collection::vec((0u64..32, value_strategy()), 0..3),
        proptest::option::of(0u64..32),
        proptest::option::weighted(0.2, 0u64..32),
        proptest::option::weighted(0.1, membership_strategy()),
        proptest::option::weighted(0.1, proptest::bool::ANY),
    )
        .prop_map(
            |(promised, accepted, learned, chosen_through, compact_below, membership, joining)| {
                Persist {
                    id: 0,
                    promised,
                    accepted: accepted
                        .into_iter()
                        .map(|(slot, ballot, value)| AcceptedEntry {
                            slot,
                            ballot,
                            value,
                        })
                        .collect(),
                    learned: learned
                        .into_iter()
                        .map(|(slot, value)| ChosenEntry { slot, value })
                        .collect(),
                    chosen_through,
                    compact_below,
                    membership,
                    joining,
                }
            },
        )
}

/// A call before ids and legality are fixed up by the harness.
#[derive(Clone, Debug)]
enum RawCall {
    Persist(Vec<Persist>),
    SaveState(Slot, Vec<(u8, Option<Vec<u8>>)>),
    Reopen,
    WriteBack,
    Checkpoint,
}

fn raw_call_strategy() -> impl Strategy<Value = RawCall> {
    prop_oneof![
        6 => proptest::collection::vec(batch_strategy(), 1..4).prop_map(RawCall::Persist),
        2 => (
            0u64..32,
            proptest::collection::vec(
                (0u8..16, proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))),
                0..8,
            ),
        )
            .prop_map(|(through, changes)| RawCall::SaveState(through, changes)),
        1 => Just(RawCall::Reopen),
        2 => Just(RawCall::WriteBack),
        1 => Just(RawCall::Checkpoint),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random batch sequences, with reopens in between, against `DurableState::apply`.
    #[test]
    fn random_batches_match_durable_state_apply(raw_calls in proptest::collection::vec(raw_call_strategy(), 1..24)) {
        let mut backend = CrashPair::new();
        let mut model = Model::new();
        let mut storage = backend.create(&model.durable);
        let mut next_id = 1;
        for raw in raw_calls {
            let call = match raw {
                RawCall::Persist(mut batches) => {
                    for batch in &mut batches {
                        batch.id = next_id;
                        next_id += 1;
                        legalize(batch, &model);
                    }
                    Call::persist(batches)
                }
                RawCall::SaveState(through, changes) => Call(vec![Write::State(StateWrite::Delta(StateDelta {
                    header: Some(header(legal_through(through, &model), &model, &[])),
                    changes: changes
                        .into_iter()
                        .map(|(key, value)| ((StateTable::Nodes, Box::from(&[key][..])), value))
                        .collect(),
                }))]),
                RawCall::Reopen => {
                    drop(storage);
                    backend = CrashPair::from_images(backend.live_images());
                    let (reopened, recovered) =
                        backend.open()
                            .expect("reopen");
                    prop_assert!(model.matches(&reopened, &recovered));
                    model.staging = None;
                    storage = reopened;
                    // The new `Storage` starts numbering batches afresh, as a restarted core does.
                    next_id = 1;
                    continue;
                }
                RawCall::WriteBack => {
                    storage.write_back().expect("write-back succeeds");
                    continue;
                }
                RawCall::Checkpoint => {
                    storage.checkpoint().expect("checkpoint succeeds");
                    continue;
                }
            };
            call.run(&mut storage).expect("legal call succeeds");
            call.apply(&mut model);
        }
        drop(storage);
        let (storage, recovered) = open_image(&backend.live_images(), "memory").expect("reopen");
        prop_assert!(model.matches(&storage, &recovered), "{:?}", recovered);
    }
}

// ---------------------------------------------------------------------------
// 2. Refusals, each naming the file.

fn assert_mentions_path(error: &StorageError, path: &Path) {
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "the error does not name {}: {message}",
        path.display()
    );
    assert_eq!(error.path(), path);
}

/// Fresh databases on disk with a few log entries, closed.
fn database_on_disk() -> (tempfile::TempDir, DatabasePaths) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let paths = DatabasePaths::in_dir(directory.path());
    let mut storage = Storage::create(&paths, identity(), &Model::new().durable).expect("create");
    storage
        .persist(&[Persist {
            id: 1,
            promised: Some(Ballot::new(1, 1)),
            accepted: vec![AcceptedEntry {
                slot: 1,
                ballot: Ballot::new(1, 1),
                value: commands(b"create /a"),
            }],
            ..Persist::default()
        }])
        .expect("persist");
    storage.close().expect("close");
    (directory, paths)
}

const RAW_META: TableDefinition<&str, &[u8]> = TableDefinition::new("synod_meta");
const RAW_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("synod_log");

#[test]
fn a_wrong_cluster_or_node_is_refused() {
    let (_directory, paths) = database_on_disk();
    let other_cluster = Identity {
        cluster_id: "other-cluster".to_string(),
        node_id: 2,
    };
    let error = Storage::open(&paths, &other_cluster).expect_err("wrong cluster");
    assert!(
        matches!(error, StorageError::WrongCluster { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("other-cluster"), "{error}");
    assert_mentions_path(&error, &paths.log);

    let other_node = Identity {
        cluster_id: "test-cluster".to_string(),
        node_id: 3,
    };
    let error = Storage::open(&paths, &other_node).expect_err("wrong node");
    assert!(
        matches!(
            error,
            StorageError::WrongNode {
                found: 2,
                expected: 3,
                ..
            }
        ),
        "{error}"
    );
    assert_mentions_path(&error, &paths.log);

    // The right identity still opens it.
    Storage::open(&paths, &identity()).expect("right identity");
}

#[test]
fn another_format_version_is_refused() {
    let (_directory, paths) = database_on_disk();
    {
        let database = redb::Database::open(&paths.log).expect("raw open");
        let transaction = database.begin_write().expect("raw write");
        {
            let mut meta = transaction.open_table(RAW_META).expect("meta table");
            // A correctly sealed version 99, as a future build would write it.
            let mut sealed = postcard::to_stdvec(&99u32).expect("encode");
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(b"synod/meta/format_version");
            hasher.update(&sealed);
            sealed.extend_from_slice(&hasher.finalize().to_le_bytes());
            meta.insert("format_version", sealed.as_slice())
                .expect("raw insert");
        }
        transaction.commit().expect("raw commit");
    }
    let error = Storage::open(&paths, &identity()).expect_err("version 99");
    assert!(
        matches!(
            error,
            StorageError::FormatVersion {
                found: 99,
                expected: 4,
                ..
            }
        ),
        "{error}"
    );
    assert_mentions_path(&error, &paths.log);
}

#[test]
fn a_damaged_log_record_is_refused() {
    let (_directory, paths) = database_on_disk();
    {
        // redb stores the damaged value faithfully, with valid page
        // checksums: only the record's own CRC-32 can catch it.
        let database = redb::Database::open(&paths.log).expect("raw open");
        let transaction = database.begin_write().expect("raw write");
        {
            let mut log = transaction.open_table(RAW_LOG).expect("log table");
            let mut value = log
                .get(1)
                .expect("raw read")
                .expect("slot 1 exists")
                .value()
                .to_vec();
            let middle = value.len() / 2;
            value[middle] ^= 0x40;
            log.insert(1, value.as_slice()).expect("raw insert");
        }
        transaction.commit().expect("raw commit");
    }
    let error = Storage::open(&paths, &identity()).expect_err("damaged record");
    assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("log slot 1"), "{error}");
    assert!(error.to_string().contains("CRC-32"), "{error}");
    assert_mentions_path(&error, &paths.log);
}

#[test]
fn inconsistent_meta_is_refused() {
    let (_directory, paths) = database_on_disk();
    {
        // A log entry below the log start, with a valid record.
        let database = redb::Database::open(&paths.log).expect("raw open");
        let transaction = database.begin_write().expect("raw write");
        {
            let mut log = transaction.open_table(RAW_LOG).expect("log table");
            let value = log
                .get(1)
                .expect("raw read")
                .expect("slot 1 exists")
                .value()
                .to_vec();
            let mut meta = transaction.open_table(RAW_META).expect("meta table");
            let mut sealed = postcard::to_stdvec(&5u64).expect("encode");
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(b"synod/meta/log_start");
            hasher.update(&sealed);
            sealed.extend_from_slice(&hasher.finalize().to_le_bytes());
            meta.insert("log_start", sealed.as_slice())
                .expect("raw insert");
            log.insert(1, value.as_slice()).expect("raw insert");
        }
        transaction.commit().expect("raw commit");
    }
    let error = Storage::open(&paths, &identity()).expect_err("inconsistent");
    assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("below its start 5"), "{error}");
    assert_mentions_path(&error, &paths.log);
}

/// A pair of databases on disk whose saved state, through slot 1, holds
/// one node record, `/a`, in set 0.
fn database_with_saved_state() -> (tempfile::TempDir, DatabasePaths) {
    let (directory, paths) = database_on_disk();
    {
        let (mut storage, _) = Storage::open(&paths, &identity()).expect("open");
        storage
            .commit(&[Write::State(StateWrite::Delta(StateDelta {
                header: Some(SavedStateHeader {
                    through: 1,
                    membership: members(&[1, 2, 3]),
                    scalars: vec![1, 2, 3],
                }),
                changes: [(
                    (StateTable::Nodes, Box::from(&b"/a"[..])),
                    Some(vec![5u8; 300]),
                )]
                .into_iter()
                .collect(),
            }))])
            .expect("save");
        storage.close().expect("close");
    }
    (directory, paths)
}

#[test]
fn a_state_record_moved_under_another_key_is_refused() {
    let (_directory, paths) = database_with_saved_state();
    {
        let database = redb::Database::open(&paths.state).expect("raw open");
        let transaction = database.begin_write().expect("raw write");
        {
            // The live set's header is where the format says it is.
            let meta = transaction.open_table(RAW_META).expect("meta table");
            assert!(meta.get("state.0").expect("raw read").is_some());
            assert!(meta.get("state.1").expect("raw read").is_none());
            let mut nodes = transaction
                .open_table(TableDefinition::<&[u8], &[u8]>::new("synod_state_nodes.0"))
                .expect("nodes table");
            let value = nodes
                .get(&b"/a"[..])
                .expect("raw read")
                .expect("/a exists")
                .value()
                .to_vec();
            nodes
                .insert(&b"/b"[..], value.as_slice())
                .expect("raw insert");
        }
        transaction.commit().expect("raw commit");
    }
    let (storage, _) = Storage::open(&paths, &identity()).expect("the log is intact");
    let error = read_records(&storage).expect_err("a record under another key");
    assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("nodes record \"/b\""), "{error}");
}

#[test]
fn an_installed_state_frees_the_set_it_replaces() {
    let (_directory, paths) = database_with_saved_state();
    {
        let (mut storage, _) = Storage::open(&paths, &identity()).expect("open");
        let header = SavedStateHeader {
            through: 5,
            membership: members(&[1, 2, 3]),
            scalars: vec![5],
        };
        storage
            .commit(&[
                Write::State(StateWrite::StageBegin),
                Write::State(StateWrite::Stage(vec![(
                    StateTable::Nodes,
                    Box::from(&b"/b"[..]),
                    b"installed".to_vec(),
                )])),
                Write::State(StateWrite::StageActivate(header)),
            ])
            .expect("install");
        let records = read_records(&storage).expect("read");
        assert_eq!(
            records
                .keys()
                .map(|(_, key)| key.clone())
                .collect::<Vec<_>>(),
            vec![b"/b".to_vec()]
        );
        storage.close().expect("close");
    }
    let database = redb::Database::open(&paths.state).expect("raw open");
    let transaction = database.begin_read().expect("raw read");
    let tables: Vec<String> = transaction
        .list_tables()
        .expect("list tables")
        .map(|table| table.name().to_string())
        .collect();
    assert!(
        tables.iter().all(|name| !name.ends_with(".0")),
        "the replaced set's tables are dropped: {tables:?}"
    );
    let meta = transaction.open_table(RAW_META).expect("meta table");
    assert!(meta.get("state.0").expect("raw read").is_none());
    assert!(meta.get("state.1").expect("raw read").is_some());
}

#[test]
fn a_damaged_state_record_is_refused() {
    let (_directory, paths) = database_with_saved_state();
    {
        // redb stores the damaged value faithfully, with valid page
        // checksums: only the record's own CRC-32 can catch it.
        let database = redb::Database::open(&paths.state).expect("raw open");
        let transaction = database.begin_write().expect("raw write");
        {
            let mut nodes = transaction
                .open_table(TableDefinition::<&[u8], &[u8]>::new("synod_state_nodes.0"))
                .expect("nodes table");
            let mut value = nodes
                .get(&b"/a"[..])
                .expect("raw read")
                .expect("/a exists")
                .value()
                .to_vec();
            value[100] ^= 1;
            nodes
                .insert(&b"/a"[..], value.as_slice())
                .expect("raw insert");
        }
        transaction.commit().expect("raw commit");
    }
    let (storage, recovered) = Storage::open(&paths, &identity()).expect("the log is intact");
    assert_eq!(recovered.state.map(|state| state.through), Some(1));
    let error = read_records(&storage).expect_err("damaged record");
    assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("nodes record \"/a\""), "{error}");
    assert!(error.to_string().contains("CRC-32"), "{error}");
    assert_mentions_path(&error, &paths.state);
}

/// Replaces one of the two files of a good pair of databases with
/// `contents` (or removes it, for `None`) and returns the open's error,
/// after checking that it names that file.
fn refused_with_file(which: usize, contents: Option<&[u8]>) -> StorageError {
    let (_directory, paths) = database_on_disk();
    let path = if which == LOG_FILE {
        &paths.log
    } else {
        &paths.state
    };
    match contents {
        Some(contents) => std::fs::write(path, contents).expect("write the file"),
        None => std::fs::remove_file(path).expect("remove the file"),
    }
    let error = Storage::open(&paths, &identity()).expect_err("refused");
    assert_mentions_path(&error, path);
    error
}

#[test]
fn a_file_that_is_not_a_database_is_refused() {
    let foreign = {
        let directory = tempfile::tempdir().expect("temporary directory");
        let path = directory.path().join("foreign.redb");
        let database = redb::Database::create(&path).expect("raw create");
        let transaction = database.begin_write().expect("raw write");
        transaction
            .open_table(TableDefinition::<u64, u64>::new("other"))
            .expect("table");
        transaction.commit().expect("raw commit");
        drop(database);
        std::fs::read(&path).expect("read the foreign database")
    };
    for which in [LOG_FILE, STATE_FILE] {
        // A database cut short inside redb's header is named as such.
        let error = refused_with_file(which, Some(&foreign[..64]));
        assert!(
            matches!(&error, StorageError::Corrupt { detail, .. } if detail.contains("too short")),
            "{error}"
        );
        for (name, contents) in [
            ("text", b"this is not a database\n".repeat(400)),
            ("short", b"redb".to_vec()),
            ("zeros", vec![0u8; 65536]),
        ] {
            let error = refused_with_file(which, Some(&contents));
            assert!(
                matches!(
                    error,
                    StorageError::Corrupt { .. } | StorageError::Database { .. }
                ),
                "{name}: {error}"
            );
        }
        // An empty file (a crash right after the file was created).
        let error = refused_with_file(which, Some(b""));
        assert!(matches!(error, StorageError::NotSynod { .. }), "{error}");
        // A redb database that is not Synod's.
        let error = refused_with_file(which, Some(&foreign));
        assert!(matches!(error, StorageError::NotSynod { .. }), "{error}");
        // No file at all: a replica that lost either file never starts as
        // if it had an empty past.
        let error = refused_with_file(which, None);
        assert!(matches!(error, StorageError::NotFound { .. }), "{error}");
    }
}

#[test]
fn one_file_in_place_of_the_other_is_refused() {
    let (_directory, paths) = database_on_disk();
    let log = std::fs::read(&paths.log).expect("read the log database");
    let state = std::fs::read(&paths.state).expect("read the state database");
    std::fs::write(&paths.log, &state).expect("swap");
    std::fs::write(&paths.state, &log).expect("swap");
    let error = Storage::open(&paths, &identity()).expect_err("swapped files");
    assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("state database, opened as its log database"),
        "{error}"
    );
    assert_mentions_path(&error, &paths.log);
}

/// Databases on disk whose last calls are only in the journal: the process
/// stopped without closing them, as after kill -9.
fn journaled_database_on_disk() -> (tempfile::TempDir, DatabasePaths, Model) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let paths = DatabasePaths::in_dir(directory.path());
    let mut model = Model::new();
    let mut storage = Storage::create(&paths, identity(), &model.durable).expect("create");
    for call in scripted_calls() {
        call.run(&mut storage).expect("call");
        call.apply(&mut model);
    }
    drop(storage);
    (directory, paths, model)
}

#[test]
fn calls_only_in_the_journal_survive_a_stop_without_close() {
    let (_directory, paths, model) = journaled_database_on_disk();
    let journal_bytes = std::fs::metadata(&paths.journal).expect("journal").len();
    let (storage, recovered) = Storage::open(&paths, &identity()).expect("open");
    assert!(
        model.matches(&storage, &recovered),
        "{:?}",
        recovered.durable
    );
    // Opening replayed the journal into the database and emptied it.
    storage.close().expect("close");
    assert!(std::fs::metadata(&paths.journal).expect("journal").len() < journal_bytes);
    let (storage, recovered) = Storage::open(&paths, &identity()).expect("reopen");
    assert!(model.matches(&storage, &recovered));
}

#[test]
fn a_missing_or_foreign_journal_is_refused() {
    let (_directory, paths, _model) = journaled_database_on_disk();
    let journal = std::fs::read(&paths.journal).expect("read the journal");
    // Without its journal the log database would lose acknowledged
    // batches: refused, and no empty journal is left in its place.
    std::fs::remove_file(&paths.journal).expect("remove the journal");
    let error = Storage::open(&paths, &identity()).expect_err("no journal");
    assert!(matches!(error, StorageError::NotFound { .. }), "{error}");
    assert_mentions_path(&error, &paths.journal);
    assert!(!paths.journal.exists());
    for contents in [&b""[..], b"this is not a journal\n", &journal[..20]] {
        std::fs::write(&paths.journal, contents).expect("write the journal");
        let error = Storage::open(&paths, &identity()).expect_err("not a journal");
        assert!(
            matches!(
                error,
                StorageError::NotSynod { .. } | StorageError::Corrupt { .. }
            ),
            "{error}"
        );
        assert_mentions_path(&error, &paths.journal);
    }
    // Another replica's journal.
    let other_directory = tempfile::tempdir().expect("temporary directory");
    let other_paths = DatabasePaths::in_dir(other_directory.path());
    let other_node = Identity {
        node_id: 3,
        ..identity()
    };
    Storage::create(&other_paths, other_node, &Model::new().durable)
        .expect("create")
        .close()
        .expect("close");
    std::fs::copy(&other_paths.journal, &paths.journal).expect("copy");
    let error = Storage::open(&paths, &identity()).expect_err("another replica's journal");
    assert!(matches!(error, StorageError::WrongNode { .. }), "{error}");
    assert_mentions_path(&error, &paths.journal);
    // Its own journal back in place: everything is there.
    std::fs::write(&paths.journal, &journal).expect("restore the journal");
    Storage::open(&paths, &identity()).expect("open");
}

#[test]
fn a_log_database_from_before_the_journal_gets_one() {
    let (_directory, paths) = database_on_disk();
    {
        let database = redb::Database::open(&paths.log).expect("raw open");
        let transaction = database.begin_write().expect("raw write");
        {
            let mut meta = transaction.open_table(RAW_META).expect("meta table");
            meta.remove("journal_group").expect("remove");
        }
        transaction.commit().expect("raw commit");
    }
    std::fs::remove_file(&paths.journal).expect("remove the journal");
    let (storage, recovered) = Storage::open(&paths, &identity()).expect("open");
    assert!(recovered.durable.log.contains_key(&1));
    assert!(paths.journal.exists());
    storage.close().expect("close");
    Storage::open(&paths, &identity()).expect("reopen with the new journal");
}

#[test]
fn a_state_database_older_than_the_log_compaction_is_refused() {
    let (_directory, paths) = database_on_disk();
    let old_state = std::fs::read(&paths.state).expect("read the state database");
    {
        let (mut storage, _) = Storage::open(&paths, &identity()).expect("open");
        storage
            .commit(&[
                Write::State(StateWrite::Delta(StateDelta {
                    header: Some(header(1, &Model::new(), b"through 1")),
                    changes: BTreeMap::new(),
                })),
                Write::Persist(Persist {
                    id: 1,
                    chosen_through: Some(1),
                    compact_below: Some(2),
                    ..Persist::default()
                }),
            ])
            .expect("save and compact");
        storage.close().expect("close");
    }
    // The state database from before the save, next to the compacted log.
    std::fs::write(&paths.state, &old_state).expect("put back the old state");
    let error = Storage::open(&paths, &identity()).expect_err("state too old");
    assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    assert!(
        error.to_string().contains("compacted below slot 2"),
        "{error}"
    );
    assert_mentions_path(&error, &paths.state);
}

#[test]
fn a_saved_state_ahead_of_the_chosen_log_covers_the_log_below_it() {
    // The state database saved through slot 3 while the log knew only
    // slot 1 chosen (the two commit apart): slots 2 and 3 of the log may
    // hold acceptances that lost, so a restart must not treat them as
    // chosen. The state covers them.
    let backend = CrashPair::new();
    let mut storage = backend.create(&Model::new().durable);
    let accept = |slot| AcceptedEntry {
        slot,
        ballot: Ballot::new(1, 1),
        value: commands(format!("slot {slot}").as_bytes()),
    };
    storage
        .commit(&[
            Write::Persist(Persist {
                id: 1,
                accepted: (1..=4).map(accept).collect(),
                chosen_through: Some(1),
                ..Persist::default()
            }),
            Write::State(StateWrite::Delta(StateDelta {
                header: Some(header(3, &Model::new(), b"through 3")),
                changes: BTreeMap::new(),
            })),
        ])
        .expect("commit");
    drop(storage);
    let (_storage, recovered) = open_image(&backend.live_images(), "memory").expect("reopen");
    assert_eq!(recovered.state.map(|state| state.through), Some(3));
    assert_eq!(recovered.durable.chosen_through, 3);
    assert_eq!(recovered.durable.log_start, 4);
    assert_eq!(
        recovered.durable.log.keys().copied().collect::<Vec<_>>(),
        vec![4],
        "only the log after the saved state is kept"
    );
    let config = synod_paxos::Config::new(2, 7);
    synod_paxos::Node::new(config, recovered.durable, 4, 0).expect("the core starts");
}

/// Runs `wait_for_saved_state` for one compaction on a thread; its answer
/// comes on the channel returned.
fn wait_for_compaction(
    log: &Arc<synod_server::storage::LogStore>,
    compact_below: Slot,
) -> std::sync::mpsc::Receiver<bool> {
    let (answer, answered) = std::sync::mpsc::channel();
    let log = Arc::clone(log);
    std::thread::spawn(move || {
        let batch = Persist {
            id: 1,
            compact_below: Some(compact_below),
            ..Persist::default()
        };
        let _ = answer.send(log.wait_for_saved_state(&[&batch]));
    });
    answered
}

#[test]
fn a_compaction_waits_for_the_saved_state_it_relies_on_and_no_other() {
    use std::time::Duration;
    let (log, mut state) = create_in_memory(&Model::new().durable).into_parts();
    let log = Arc::new(log);
    // Compacting below the log's start relies on no saved state.
    let none_needed = wait_for_compaction(&log, 0);
    assert_eq!(
        none_needed.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "a compaction below the log's start waited"
    );
    assert!(log.wait_for_saved_state(&[&Persist::default()]));
    // Compacting below slot 3 needs the state through slot 2.
    let needs_two = wait_for_compaction(&log, 3);
    let save_through = |state: &mut synod_server::storage::StateStore, through: Slot| {
        let write = StateWrite::Delta(StateDelta {
            header: Some(SavedStateHeader {
                through,
                membership: members(&[1, 2, 3]),
                scalars: vec![through as u8],
            }),
            changes: BTreeMap::new(),
        });
        state.commit(&[&write]).expect("save the state");
    };
    save_through(&mut state, 1);
    assert_eq!(
        needs_two.recv_timeout(Duration::from_millis(300)),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout),
        "a compaction went ahead of the state it relies on"
    );
    save_through(&mut state, 2);
    assert_eq!(needs_two.recv_timeout(Duration::from_secs(10)), Ok(true));
    // Once the state database is closed, a compaction it never saved for
    // is refused.
    let needs_five = wait_for_compaction(&log, 5);
    state.close().expect("close the state database");
    assert_eq!(needs_five.recv_timeout(Duration::from_secs(10)), Ok(false));
}

#[test]
fn the_bytes_of_a_replicas_files_are_what_the_files_hold() {
    let (directory, paths) = database_on_disk();
    let on_disk = std::fs::metadata(&paths.log).expect("log").len()
        + std::fs::metadata(&paths.state).expect("state").len()
        + std::fs::metadata(&paths.journal).expect("journal").len();
    assert!(on_disk > 0);
    assert_eq!(paths.bytes(), on_disk);
    std::fs::remove_file(&paths.state).expect("remove the state file");
    std::fs::remove_file(&paths.journal).expect("remove the journal");
    assert_eq!(
        paths.bytes(),
        std::fs::metadata(&paths.log).expect("log").len(),
        "a missing file counts nothing"
    );
    assert_eq!(
        DatabasePaths::in_dir(&directory.path().join("none")).bytes(),
        0
    );
}

#[test]
fn each_writer_poisons_only_its_own_database_and_reports_it_at_close() {
    let (mut log, mut state) = create_in_memory(&Model::new().durable).into_parts();
    let past_the_saved_state = Persist {
        id: 1,
        compact_below: Some(3),
        ..Persist::default()
    };
    let error = log
        .commit(&[&past_the_saved_state])
        .expect_err("a compaction past the saved state");
    assert!(matches!(error, StorageError::Refused { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("compacts the log below slot 3, past the saved state (none is saved)"),
        "{error}"
    );
    let cause = log.poisoned().expect("the log is poisoned");
    assert!(error.to_string().contains(cause), "{cause:?} in {error}");
    assert_eq!(state.poisoned(), None, "the state database is not");
    let again = log.commit(&[]).expect_err("poisoned");
    assert!(matches!(again, StorageError::Poisoned { .. }), "{again}");
    let closed = log.close().expect_err("the poison is reported at close");
    assert!(matches!(closed, StorageError::Poisoned { .. }), "{closed}");

    let unstaged = StateWrite::StageActivate(header(4, &Model::new(), b""));
    let error = state.commit(&[&unstaged]).expect_err("not staged");
    assert!(state
        .poisoned()
        .is_some_and(|cause| error.to_string().contains(cause)));
    let closed = state.close().expect_err("the poison is reported at close");
    assert!(matches!(closed, StorageError::Poisoned { .. }), "{closed}");
}

#[test]
fn a_database_already_open_is_refused() {
    let (_directory, paths) = database_on_disk();
    let (first, _) = Storage::open(&paths, &identity()).expect("first open");
    let error = Storage::open(&paths, &identity()).expect_err("second open");
    assert!(matches!(error, StorageError::AlreadyOpen { .. }), "{error}");
    assert_mentions_path(&error, &paths.log);
    drop(first);
    Storage::open(&paths, &identity()).expect("open after the first closed");
}

#[test]
fn illegal_calls_are_refused_and_poison() {
    let mut storage = create_in_memory(&Model::new().durable);
    // Compaction with no snapshot saved would lose chosen slots.
    let error = storage
        .persist(&[Persist {
            id: 1,
            compact_below: Some(3),
            ..Persist::default()
        }])
        .expect_err("compaction past the saved state");
    assert!(matches!(error, StorageError::Refused { .. }), "{error}");
    let cause = storage.poisoned().expect("poisoned");
    assert!(
        error.to_string().contains(cause),
        "the poison names the first error: {cause:?} in {error}"
    );
    let error = read_records(&storage).expect_err("poisoned");
    assert!(matches!(error, StorageError::Poisoned { .. }), "{error}");

    // A saved state may not go back, leave a gap before the log, or be
    // installed without staging; each is refused and writes nothing.
    let model = Model::new();
    let delta = |through| {
        Write::State(StateWrite::Delta(StateDelta {
            header: Some(header(through, &model, b"")),
            changes: BTreeMap::new(),
        }))
    };
    for (writes, what) in [
        (vec![delta(5), delta(4)], "back"),
        (
            vec![Write::State(StateWrite::StageActivate(header(
                9, &model, b"",
            )))],
            "before staging began",
        ),
        (
            vec![Write::State(StateWrite::Stage(vec![(
                StateTable::Nodes,
                Box::from(&b"/"[..]),
                vec![],
            )]))],
            "before staging began",
        ),
    ] {
        let mut storage = create_in_memory(&model.durable);
        let error = storage.commit(&writes).expect_err("refused");
        assert!(matches!(error, StorageError::Refused { .. }), "{error}");
        assert!(error.to_string().contains(what), "{error}");
    }

    let mut storage = create_in_memory(&Model::new().durable);
    let batch = |id| Persist {
        id,
        promised: Some(Ballot::new(id, 1)),
        ..Persist::default()
    };
    storage.persist(&[batch(1), batch(2)]).expect("in order");
    let error = storage.persist(&[batch(2)]).expect_err("out of order");
    assert!(matches!(error, StorageError::Refused { .. }), "{error}");

    // A non-empty backend is not a place to create a database.
    let backend = InMemoryBackend::new();
    backend.set_len(10).expect("set_len");
    let error = Storage::create_with_backends(
        backend,
        InMemoryBackend::new(),
        InMemoryBackend::new(),
        &memory_paths("memory"),
        identity(),
        &Model::new().durable,
    )
    .expect_err("not empty");
    assert!(
        matches!(error, StorageError::AlreadyExists { .. }),
        "{error}"
    );
}

// ---------------------------------------------------------------------------
// 3. Crash images.

/// A random call of the crash workload, legal for the model: batches and
/// state writes in one commit, as the replica's writer makes them.
fn random_call(rng: &mut ChaCha8Rng, model: &Model, next_id: &mut u64) -> Call {
    // Writes are legal against the model as the earlier ones in the same
    // commit leave it.
    let mut scratch = model.clone();
    let mut writes = Vec::new();
    for _ in 0..rng.random_range(1..=4) {
        let write = if rng.random_bool(0.25) {
            random_state_write(rng, &scratch)
        } else {
            Write::Persist(random_batch(rng, &scratch, next_id))
        };
        scratch.apply(&write);
        writes.push(write);
    }
    Call(writes)
}

fn random_batch(rng: &mut ChaCha8Rng, model: &Model, next_id: &mut u64) -> Persist {
    let log_end = model.durable.log.keys().next_back().copied().unwrap_or(0);
    let mut batch = Persist {
        id: *next_id,
        ..Persist::default()
    };
    *next_id += 1;
    if rng.random_bool(0.3) {
        batch.promised = Some(Ballot::new(rng.random_range(0..20), rng.random_range(1..4)));
    }
    for _ in 0..rng.random_range(0..6) {
        let slot = log_end.saturating_sub(3) + rng.random_range(0..8);
        let payload: Vec<u8> = (0..rng.random_range(0..3_000))
            .map(|_| rng.random())
            .collect();
        batch.accepted.push(AcceptedEntry {
            slot,
            ballot: Ballot::new(rng.random_range(0..20), rng.random_range(1..4)),
            value: commands(&payload),
        });
    }
    if rng.random_bool(0.2) {
        batch.learned.push(ChosenEntry {
            slot: log_end + rng.random_range(0..3),
            value: Value::Noop,
        });
    }
    if rng.random_bool(0.4) {
        batch.chosen_through = Some(log_end.saturating_sub(rng.random_range(0..3)));
    }
    if rng.random_bool(0.15) {
        batch.compact_below = Some(rng.random_range(0..=log_end));
        legalize(&mut batch, model);
    }
    if rng.random_bool(0.05) {
        batch.membership = Some(members(&[1, 2, 3, rng.random_range(4..9)]));
    }
    batch
}

/// What reopening a crash image gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// A clean refusal (allowed only while the database is being created).
    Refused,
    /// The state before the call in flight.
    Before,
    /// The state database after the call in flight, the log before it: a
    /// crash between the two databases' commits (the state commits first).
    StateOnly,
    /// The state after the call in flight.
    After,
}

/// Checks one crash image: it must open, never panic, and hold exactly the
/// state `before` or `after` the call in flight, or the state database's
/// part of the call without the log's (so nothing acknowledged is lost,
/// nothing is half-applied in either database, and the log never holds a
/// call's batches without its state writes). While `creating`, an image may also be
/// refused cleanly with an error naming the database: nothing was
/// acknowledged yet.
fn check_image(
    image: &CrashImage,
    before: Option<&Model>,
    after: &Model,
    creating: bool,
    context: &str,
) -> Result<Outcome, String> {
    let opened = std::panic::catch_unwind(|| open_image(&image.bytes, "crash-image"));
    match opened {
        Err(_) => Err(format!(
            "{context}: opening the image ({}) panicked",
            image.how
        )),
        Ok(Err(error)) if creating => {
            if error.to_string().contains("crash-image") {
                Ok(Outcome::Refused)
            } else {
                Err(format!(
                    "{context}: error does not name the database: {error}"
                ))
            }
        }
        Ok(Err(error)) => Err(format!(
            "{context}: the image ({}) does not open: {error}",
            image.how
        )),
        Ok(Ok((storage, recovered))) => {
            if after.matches(&storage, &recovered) {
                Ok(Outcome::After)
            } else if before.is_some_and(|before| before.matches(&storage, &recovered)) {
                Ok(Outcome::Before)
            } else if before
                .is_some_and(|before| matches_parts(before, after, &storage, &recovered))
            {
                Ok(Outcome::StateOnly)
            } else {
                Err(format!(
                    "{context}: the image ({}) holds a state that is neither before nor after the call: promised {}, chosen_through {}, log_start {}, {} log entries, state through {:?}, {:?} records",
                    image.how,
                    recovered.durable.promised,
                    recovered.durable.chosen_through,
                    recovered.durable.log_start,
                    recovered.durable.log.len(),
                    recovered.state.as_ref().map(|state| state.through),
                    read_records(&storage).map(|records| records.len()),
                ))
            }
        }
    }
}

/// Counts what the crash images gave, by how each was made.
#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<(&'static str, Outcome), usize>,
    failures: Vec<String>,
}

impl Tally {
    fn check(
        &mut self,
        image: &CrashImage,
        before: Option<&Model>,
        after: &Model,
        creating: bool,
        context: &str,
    ) {
        match check_image(image, before, after, creating, context) {
            Ok(outcome) => *self.outcomes.entry((image.how, outcome)).or_default() += 1,
            Err(failure) => self.failures.push(failure),
        }
    }

    fn images(&self) -> usize {
        self.outcomes.values().sum::<usize>() + self.failures.len()
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.outcomes
            .iter()
            .filter(|((_, counted), _)| *counted == outcome)
            .map(|(_, count)| count)
            .sum()
    }
}

#[test]
fn every_crash_image_reopens_with_every_acknowledged_call() {
    // SYNOD_STORAGE_CALLS makes a longer soak.
    let calls: usize = std::env::var("SYNOD_STORAGE_CALLS").map_or(250, |text| {
        text.parse().expect("SYNOD_STORAGE_CALLS is a count")
    });
    let seed = match std::env::var("SYNOD_STORAGE_SEED") {
        Ok(text) => text.parse().expect("SYNOD_STORAGE_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64),
    };
    println!("crash test seed {seed} (replay with SYNOD_STORAGE_SEED={seed})");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut backend = CrashPair::new();
    backend.disks().recording = Some(ChaCha8Rng::seed_from_u64(seed ^ 0x5eed));

    let mut tally = Tally::default();
    let mut model = Model::new();
    let mut storage = backend.create(&model.durable);
    for image in backend.take_images() {
        tally.check(&image, None, &model, true, "during create");
    }

    let mut next_id = 1;
    let mut syncs_before = backend.syncs();
    let mut restarts = 0usize;
    for call_index in 0..calls {
        let call = random_call(&mut rng, &model, &mut next_id);
        let before = model.clone();
        let state_length_before = backend.state_length();
        call.apply(&mut model);
        call.run(&mut storage)
            .unwrap_or_else(|error| panic!("seed {seed}: call {call_index} failed: {error}"));
        let context = format!("seed {seed}, call {call_index}");
        let images = backend.take_images();
        for image in &images {
            tally.check(image, Some(&before), &model, false, &context);
        }
        // Acknowledged: the synced bytes alone must hold this call.
        let acknowledged = CrashImage {
            bytes: backend.durable_images(),
            how: "the synced bytes after the call returned",
        };
        tally.check(&acknowledged, None, &model, false, &context);
        let syncs = backend.syncs();
        if call.must_sync() {
            assert!(
                syncs > syncs_before,
                "seed {seed}: call {call_index} committed without a sync"
            );
        } else if backend.state_length() == state_length_before {
            // Staging alone is not synced, unless redb grows the file for
            // it (it syncs the new length).
            assert_eq!(
                syncs, syncs_before,
                "seed {seed}: call {call_index} only stages, and synced"
            );
        }
        syncs_before = syncs;

        // The writer thread writes the journaled batches back to the
        // database when it is idle, and checkpoints now and then: nothing
        // acknowledged may depend on either having finished.
        let maintenance = if rng.random_bool(0.1) {
            Some(("checkpoint", storage.checkpoint()))
        } else if rng.random_bool(0.4) {
            Some(("write-back", storage.write_back().map(|_| ())))
        } else {
            None
        };
        if let Some((what, result)) = maintenance {
            result.unwrap_or_else(|error| {
                panic!("seed {seed}: {what} after call {call_index} failed: {error}")
            });
            let context = format!("{context}, {what}");
            for image in &backend.take_images() {
                tally.check(image, None, &model, false, &context);
            }
            syncs_before = backend.syncs();
        }
        assert!(
            tally.failures.len() < 20,
            "seed {seed}: {:#?}",
            tally.failures
        );

        // Now and then the replica really crashes: it restarts from one of
        // this call's crash images and carries on from whatever it recovered
        // (repair after a crash, then more commits, then more crashes).
        if !images.is_empty() && rng.random_bool(0.06) {
            let image = &images[rng.random_range(0..images.len())];
            drop(storage);
            backend = CrashPair::from_images(image.bytes.clone());
            backend.disks().recording = Some(ChaCha8Rng::seed_from_u64(rng.random()));
            let (restarted, recovered) = backend
                .open()
                .unwrap_or_else(|error| panic!("{context}: restart failed: {error}"));
            let recovered = if model.matches(&restarted, &recovered) {
                model.clone()
            } else if before.matches(&restarted, &recovered) {
                before.clone()
            } else if matches_parts(&before, &model, &restarted, &recovered) {
                Model {
                    durable: before.durable.clone(),
                    ..model.clone()
                }
            } else {
                panic!(
                    "{context}: the restart recovered neither the state before nor after the call"
                )
            };
            // What was staged is lost with the process, as in the replica.
            model = Model {
                staging: None,
                ..recovered
            };
            storage = restarted;
            // A restarted core numbers its batches from 1 again.
            next_id = 1;
            restarts += 1;
            // A crash during the repair that opening did loses nothing either.
            let context = format!("{context}, restart");
            for image in backend.take_images() {
                tally.check(&image, None, &model, false, &context);
            }
            syncs_before = backend.syncs();
        }
    }

    // A clean shutdown writes too; a crash during it loses nothing.
    drop(storage);
    let context = format!("seed {seed}, shutdown");
    for image in backend.take_images() {
        tally.check(&image, None, &model, false, &context);
    }
    println!(
        "crash test seed {seed}: {calls} calls, {restarts} restarts from a crash image, {} crash images checked",
        tally.images()
    );
    for ((how, outcome), count) in &tally.outcomes {
        println!("  {count:5} x {outcome:?}: {how}");
    }
    assert!(
        tally.failures.is_empty(),
        "seed {seed}: {:#?}",
        tally.failures
    );
    assert!(
        tally.images() > 4 * calls,
        "too few crash images: {}",
        tally.images()
    );
    // The images must exercise both sides of a commit, or they prove nothing.
    assert!(
        tally.count(Outcome::Before) > calls / 4,
        "seed {seed}: too few images rolled back"
    );
    assert!(
        tally.count(Outcome::After) > calls,
        "seed {seed}: too few images committed"
    );
}

// ---------------------------------------------------------------------------
// 4. Fail-stop on a failed fsync.

#[test]
fn a_failed_sync_fails_persist_and_poisons_the_storage_for_good() {
    let backend = CrashPair::new();
    let mut model = Model::new();
    let mut storage = backend.create(&model.durable);
    let first = Call::persist(vec![Persist {
        id: 1,
        promised: Some(Ballot::new(1, 1)),
        accepted: vec![AcceptedEntry {
            slot: 1,
            ballot: Ballot::new(1, 1),
            value: commands(b"one"),
        }],
        ..Persist::default()
    }]);
    first.run(&mut storage).expect("first persist");
    first.apply(&mut model);

    backend.fail_syncs(true);
    let second = vec![Persist {
        id: 2,
        promised: Some(Ballot::new(2, 1)),
        ..Persist::default()
    }];
    let error = storage.persist(&second).expect_err("the fsync fails");
    // The batch is made durable in the journal: its sync is the one that
    // fails.
    assert!(matches!(error, StorageError::Io { .. }), "{error}");
    assert!(error.to_string().contains("memory-journal"), "{error}");
    assert!(storage.poisoned().is_some());

    // The disk recovers, the storage does not: fail-stop.
    backend.fail_syncs(false);
    let third = [Persist {
        id: 3,
        promised: Some(Ballot::new(3, 1)),
        ..Persist::default()
    }];
    for result in [
        storage.persist(&third),
        storage.persist(&[]),
        storage.commit(&[Write::State(StateWrite::StageBegin)]),
        read_records(&storage).map(|_| ()),
    ] {
        let error = result.expect_err("poisoned");
        assert!(matches!(error, StorageError::Poisoned { .. }), "{error}");
        assert!(
            error.to_string().contains("injected fsync failure")
                || error.to_string().contains("fsync"),
            "{error}"
        );
    }
    let error = storage.close().expect_err("poisoned");
    assert!(matches!(error, StorageError::Poisoned { .. }), "{error}");

    // Restarting from what reached the disk gives the acknowledged state.
    let (storage, recovered) = open_image(&backend.durable_images(), "restarted").expect("reopen");
    assert!(
        model.matches(&storage, &recovered),
        "{:?}",
        recovered.durable
    );
}

#[test]
fn recovered_state_restarts_a_paxos_core() {
    // The storage's output is what `Node::new` takes.
    let directory = tempfile::tempdir().expect("temporary directory");
    let paths = DatabasePaths::in_dir(directory.path());
    let state = DurableState::bootstrap(members(&[1, 2, 3]));
    drop(Storage::create(&paths, identity(), &state).expect("create"));
    let (_storage, recovered) = Storage::open(&paths, &identity()).expect("open");
    assert_eq!(recovered.durable, state);
    assert_eq!(recovered.state, None);
    let config = synod_paxos::Config::new(2, 7);
    synod_paxos::Node::new(config, recovered.durable, 1, 0).expect("the core starts");
}

#[test]
fn a_failed_write_poisons_the_storage_too() {
    let backend = CrashPair::new();
    let model = Model::new();
    let mut storage = backend.create(&model.durable);
    backend.fail_writes(true);
    let error = storage
        .commit(&[Write::State(StateWrite::Delta(StateDelta {
            header: Some(header(0, &model, b"")),
            changes: [(
                (StateTable::Nodes, Box::from(&b"/"[..])),
                Some(vec![7u8; 100_000]),
            )]
            .into_iter()
            .collect(),
        }))])
        .expect_err("the write fails");
    assert!(matches!(error, StorageError::Database { .. }), "{error}");
    backend.fail_writes(false);
    let error = storage
        .persist(&[Persist {
            id: 1,
            promised: Some(Ballot::new(1, 1)),
            ..Persist::default()
        }])
        .expect_err("poisoned");
    assert!(matches!(error, StorageError::Poisoned { .. }), "{error}");
    assert!(
        error.to_string().contains("injected write failure"),
        "{error}"
    );
    drop(storage);
    let (storage, recovered) = open_image(&backend.durable_images(), "restarted").expect("reopen");
    assert!(model.matches(&storage, &recovered));
}

#[test]
fn storage_can_move_between_threads_and_be_shared_for_reads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Storage>();
    assert_send_sync::<StorageError>();
}

// ---------------------------------------------------------------------------
// 5. Damage after the fact: flipped bits never cause a panic.

#[test]
fn flipped_bits_are_refused_or_harmless_and_never_panic() {
    let seed = match std::env::var("SYNOD_STORAGE_SEED") {
        Ok(text) => text.parse().expect("SYNOD_STORAGE_SEED is a u64"),
        Err(_) => 11,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let backend = CrashPair::new();
    let mut model = Model::new();
    let mut history = vec![model.clone()];
    let mut storage = backend.create(&model.durable);
    let mut next_id = 1;
    for call_index in 0..20 {
        let call = random_call(&mut rng, &model, &mut next_id);
        call.run(&mut storage).expect("call");
        call.apply(&mut model);
        history.push(model.clone());
        // Some calls are in the log database, written back and
        // checkpointed, and the rest only in the journal.
        match call_index {
            7 => storage.checkpoint().expect("checkpoint"),
            13 => {
                storage.write_back().expect("write-back");
            }
            _ => {}
        }
    }
    drop(storage);
    let image = backend.live_images();
    let (mut intact, mut refused, mut older) = (0, 0, 0);
    // SYNOD_STORAGE_FLIPS makes a longer soak.
    let flips: usize = std::env::var("SYNOD_STORAGE_FLIPS").map_or(300, |text| {
        text.parse().expect("SYNOD_STORAGE_FLIPS is a count")
    });
    for flip in 0..flips {
        let mut damaged = image.clone();
        let file = &mut damaged[flip / 2 % FILES];
        // Half the flips hit the header region, where a few bytes matter most.
        let offset = if flip % 2 == 0 {
            rng.random_range(0..file.len().min(4096))
        } else {
            rng.random_range(0..file.len())
        };
        file[offset] ^= 1 << rng.random_range(0..8);
        let opened = std::panic::catch_unwind(|| open_image(&damaged, "damaged"));
        match opened {
            Err(_) => panic!("seed {seed}: opening with byte {offset} flipped panicked"),
            Ok(Err(error)) => {
                assert!(
                    [
                        Path::new("damaged"),
                        Path::new("damaged-state"),
                        Path::new("damaged-journal")
                    ]
                    .contains(&error.path()),
                    "{error}"
                );
                refused += 1;
            }
            Ok(Ok((storage, _))) if read_records(&storage).is_err() => refused += 1,
            Ok(Ok((storage, recovered))) if model.matches(&storage, &recovered) => intact += 1,
            Ok(Ok((storage, recovered))) => {
                assert!(
                    history
                        .iter()
                        .any(|earlier| earlier.matches(&storage, &recovered)),
                    "seed {seed}: byte {offset} flipped opened to a state that never existed"
                );
                older += 1;
            }
        }
    }
    println!(
        "bit flips (seed {seed}): {intact} harmless, {refused} refused, {older} reopened an older commit"
    );
}
