//! Large values, stored as small pieces. sled 0.34.7 writes any log item over a quarter of a
//! segment (128 KiB: a large value, or a leaf holding several medium ones) to a blob file,
//! and never deletes those files: overwritten or removed, they stay on disk for good
//! (measured: 300 overwrites of one 1 MiB value left 300 MiB in `db/blobs`, and reopening
//! did not reclaim it). So no value the store writes is larger than [`PIECE_BYTES`]: a
//! record that encodes larger is written as pieces in the `pieces` tree, under an owner id
//! from `generate_id`, and the record's tree holds a pointer `[SPILLED, owner, length]`.
//!
//! Pieces are written before their pointer, in log order, so a recovered pointer always
//! has its pieces. They are never deleted with the record: the retention sweep collects
//! owners that no value points at (replaced or removed records, or a write cut short by a
//! crash) once they have stayed unreferenced for two sweeps, so a reader that has just
//! read a pointer always finds its pieces; and an owner spilled less than `hold` ago
//! (the sweep passes two intervals, at least a second) is not collected before a sweep
//! has seen it referenced, so a write that is slow to store its pointer keeps its pieces.
//!
//! Ids: sled's `generate_id` counter lives outside the trees, so a copy made by an online
//! backup would count from zero again and hand out ids its data already uses. Ids are
//! therefore `id_base` (in `meta`, written by the backup into the copy) plus
//! `generate_id`.

use std::borrow::Cow;
use std::collections::HashSet;

use serde::{de::DeserializeOwned, Serialize};

use super::{codec, Result, StoreError};

/// Largest value written to sled, and the size of a piece. A leaf of sled 0.34 holds up to
/// 17 entries before it splits, so even a full leaf of pieces stays far below the blob
/// threshold.
pub const PIECE_BYTES: usize = 4096;
/// Key in `meta` of the id base (u64, big-endian).
pub const ID_BASE_KEY: &[u8] = b"id_base";
/// In-flight entries beyond which stale ones are dropped at once.
const IN_FLIGHT_CAP: usize = 65_536;
const IN_FLIGHT_STALE: std::time::Duration = std::time::Duration::from_secs(600);
/// First byte of a pointer (never a codec format version).
const SPILLED: u8 = 0xF5;
const POINTER_LEN: usize = 17;

/// Large-value storage of one sled database.
pub struct Spill {
    db: sled::Db,
    pieces: sled::Tree,
    id_base: u64,
    gc: std::sync::Mutex<SpillGc>,
    /// Owners spilled and not yet seen referenced by a sweep, with when.
    in_flight: std::sync::Mutex<std::collections::HashMap<u64, std::time::Instant>>,
}

/// The GC's memory between sweeps.
#[derive(Default)]
struct SpillGc {
    /// Owners allocated before this id existed when the last sweep began.
    watermark: u64,
    /// Owners that were unreferenced at the last sweep.
    candidates: HashSet<u64>,
}

/// `(owner, length)` of a pointer value.
pub fn spilled(value: &[u8]) -> Option<(u64, u64)> {
    if value.len() != POINTER_LEN || value[0] != SPILLED {
        return None;
    }
    let owner = u64::from_be_bytes(value[1..9].try_into().ok()?);
    let len = u64::from_be_bytes(value[9..17].try_into().ok()?);
    Some((owner, len))
}

fn piece_key(owner: u64, index: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&owner.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

fn owner_of(key: &[u8]) -> u64 {
    let mut owner = [0u8; 8];
    owner.copy_from_slice(&key[..8]);
    u64::from_be_bytes(owner)
}

impl Spill {
    pub fn open(db: &sled::Db) -> Result<Spill> {
        let recorded = match db.open_tree("meta")?.get(ID_BASE_KEY)? {
            Some(bytes) => u64::from_be_bytes(
                bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("the id base is not 8 bytes".into()))?,
            ),
            None => 0,
        };
        // A copy made before ids had a base: start above the highest id in use.
        let pieces = db.open_tree("pieces")?;
        let mut id_base = recorded;
        for tree in [&pieces, &db.open_tree("contexts")?] {
            if let Some((key, _)) = tree.last()? {
                id_base = id_base.max(owner_of(&key) + 1);
            }
        }
        Ok(Spill {
            pieces,
            db: db.clone(),
            id_base,
            gc: Default::default(),
            in_flight: Default::default(),
        })
    }

    /// A new id, above every id this database (or the one it was backed up from) gave out.
    pub fn next_id(&self) -> Result<u64> {
        Ok(self.id_base + self.db.generate_id()?)
    }

    /// Encodes a record for storage, spilling it into pieces when it is large.
    pub fn encoded<T: Serialize>(&self, value: &T) -> Result<Vec<u8>> {
        self.spill(codec::encode(value))
    }

    /// `bytes`, or a pointer to pieces holding them. Needs no write gate: the pieces of a
    /// pointer a backup copies were written before it, and pieces without a pointer are
    /// garbage the copy's own sweep collects.
    pub fn spill(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        if bytes.len() <= PIECE_BYTES {
            return Ok(bytes);
        }
        let owner = self.next_id()?;
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded even if sweeps stop (a failing sweep prunes nothing): a pointer is
            // written within its store call, so an entry this old is long settled.
            if in_flight.len() >= IN_FLIGHT_CAP {
                in_flight.retain(|_, at| at.elapsed() < IN_FLIGHT_STALE);
            }
            in_flight.insert(owner, std::time::Instant::now());
        }
        let mut batch = sled::Batch::default();
        for (index, piece) in bytes.chunks(PIECE_BYTES).enumerate() {
            batch.insert(&piece_key(owner, index as u32), piece);
        }
        self.pieces.apply_batch(batch)?;
        let mut pointer = Vec::with_capacity(POINTER_LEN);
        pointer.push(SPILLED);
        pointer.extend_from_slice(&owner.to_be_bytes());
        pointer.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        Ok(pointer)
    }

    /// The bytes a stored value stands for.
    pub fn resolve<'a>(&self, value: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        let Some((owner, len)) = spilled(value) else {
            return Ok(Cow::Borrowed(value));
        };
        let mut bytes = Vec::with_capacity(len as usize);
        for item in self
            .pieces
            .range(piece_key(owner, 0)..piece_key(owner + 1, 0))
        {
            let (_, piece) = item?;
            bytes.extend_from_slice(&piece);
        }
        if bytes.len() as u64 != len {
            return Err(StoreError::Corrupt(format!(
                "a large value (owner {owner}) has {} of its {len} bytes",
                bytes.len()
            )));
        }
        Ok(Cow::Owned(bytes))
    }

    pub fn decode<T: DeserializeOwned>(&self, value: &[u8]) -> Result<T> {
        codec::decode(&self.resolve(value)?)
    }

    pub fn get_decoded<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<T>> {
        match tree.get(key)? {
            Some(value) => Ok(Some(self.decode(&value)?)),
            None => Ok(None),
        }
    }

    /// An id below every owner allocated from now on: the `watermark` for the next
    /// [`Spill::collect`], taken before its scan for references begins.
    pub fn watermark(&self) -> Result<u64> {
        self.next_id()
    }

    /// Deletes the pieces of owners that no value has pointed at for two sweeps.
    /// `referenced` holds every owner a value pointed at during this sweep's scan, and
    /// `watermark` an id taken before that scan began; owners spilled within `hold` and
    /// not seen referenced yet are kept. Returns the owners deleted.
    pub fn collect(
        &self,
        referenced: &HashSet<u64>,
        watermark: u64,
        hold: std::time::Duration,
    ) -> Result<u64> {
        // Owners whose pointer may not be written yet hold the watermark below them.
        let lowest_in_flight = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            in_flight.retain(|owner, at| !referenced.contains(owner) && at.elapsed() < hold);
            in_flight.keys().min().copied()
        };
        let mut gc = self.gc.lock().unwrap_or_else(|p| p.into_inner());
        // Owners allocated since the last sweep began may not have their pointer yet.
        let limit = lowest_in_flight.map_or(gc.watermark, |owner| owner.min(gc.watermark));
        let previous = std::mem::take(&mut gc.candidates);
        let mut candidates = HashSet::new();
        let mut deleted = 0;
        let mut cursor = 0u64;
        loop {
            let Some(item) = self.pieces.range(piece_key(cursor, 0)..).next() else {
                break;
            };
            let (key, _) = item?;
            let owner = owner_of(&key);
            if owner >= limit {
                break;
            }
            if !referenced.contains(&owner) {
                if previous.contains(&owner) {
                    let mut batch = sled::Batch::default();
                    for piece in self
                        .pieces
                        .range(piece_key(owner, 0)..piece_key(owner + 1, 0))
                    {
                        batch.remove(piece?.0);
                    }
                    self.pieces.apply_batch(batch)?;
                    deleted += 1;
                } else {
                    candidates.insert(owner);
                }
            }
            cursor = owner + 1;
        }
        gc.watermark = watermark;
        gc.candidates = candidates;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    const HOLD: std::time::Duration = std::time::Duration::from_secs(60);

    #[test]
    fn large_values_round_trip_as_pieces_and_unreferenced_pieces_go() {
        let (_dir, store) = temp_store();
        let store = &store.spill;
        let small = store.encoded(&"x".repeat(100)).unwrap();
        assert!(spilled(&small).is_none());
        let big_value = "y".repeat(100_000);
        let big = store.encoded(&big_value).unwrap();
        let (owner, len) = spilled(&big).expect("a pointer");
        assert!(len > 100_000);
        assert_eq!(store.decode::<String>(&big).unwrap(), big_value);
        assert_eq!(store.pieces.len(), 100_010usize.div_ceil(PIECE_BYTES));
        // A sweep that sees the pointer referenced ends its in-flight protection.
        assert_eq!(store.collect(&HashSet::from([owner]), 0, HOLD).unwrap(), 0);

        // Referenced pieces stay; unreferenced ones go on the second sweep that sees them.
        let watermark = store.watermark().unwrap();
        let held = HashSet::from([owner]);
        assert_eq!(store.collect(&held, watermark, HOLD).unwrap(), 0);
        assert_eq!(store.collect(&held, watermark, HOLD).unwrap(), 0);
        let none = HashSet::new();
        assert_eq!(store.collect(&none, watermark, HOLD).unwrap(), 0);
        assert!(!store.pieces.is_empty(), "one sweep of grace");
        assert_eq!(store.collect(&none, watermark, HOLD).unwrap(), 1);
        assert_eq!(store.pieces.len(), 0);
        assert!(matches!(
            store.decode::<String>(&big),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_copy_without_an_id_base_starts_above_the_ids_it_holds() {
        let (_dir, store) = temp_store();
        let pointer = store.spill.encoded(&"z".repeat(10_000)).unwrap();
        let (owner, _) = spilled(&pointer).unwrap();
        // What a backup made before ids had a base holds: the trees, no id base.
        let copy_dir = tempfile::tempdir().unwrap();
        let copy = sled::Config::new().path(copy_dir.path()).open().unwrap();
        let pieces = copy.open_tree("pieces").unwrap();
        for item in store.spill.pieces.iter() {
            let (key, value) = item.unwrap();
            pieces.insert(key, value).unwrap();
        }
        let reopened = Spill::open(&copy).unwrap();
        assert!(reopened.next_id().unwrap() > owner);
        assert_eq!(
            reopened.decode::<String>(&pointer).unwrap(),
            "z".repeat(10_000)
        );
    }
}
