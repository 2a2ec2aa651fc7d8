//! TensorBoard event files (`use_tensorboard: true` or `report_to: tensorboard`): the run's scalars in
//! `output_dir/runs/events.out.tfevents.<time>.<host>.<pid>.<n>.loratune`, which `tensorboard --logdir output_dir/runs`
//! reads.
//!
//! The format is small, so it is written here rather than pulling in a protobuf stack: a file is a sequence of
//! records `u64 length (LE) · masked CRC-32C of the length · data · masked CRC-32C of the data`, each `data` an
//! `Event` protobuf. The first event carries `file_version: "brain.Event:2"`; each logged step is one event with a
//! `Summary` of `simple_value`s. A resumed run starts a new file with a `SessionLog START` at the step after its
//! checkpoint, which makes TensorBoard drop the older file's points from that step on (the ones the run redoes).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The folder under `output_dir` the event files go to.
pub const DIR: &str = "runs";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bytewise with a table.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One record: length, its CRC, the data, its CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// What an `Event` carries besides its time and step.
enum Payload<'a> {
    FileVersion,
    Scalars(&'a [(&'a str, f32)]),
    SessionStart,
}

/// An `Event` protobuf: wall_time (1, double), step (2, int64), then file_version (3), summary (5) or
/// session_log (7).
fn event(wall_time: f64, step: i64, payload: Payload<'_>) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        e.push(0x10);
        varint(step as u64, &mut e);
    }
    match payload {
        Payload::FileVersion => bytes_field(3, b"brain.Event:2", &mut e),
        Payload::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                // Summary.Value: tag (1, string), simple_value (2, float).
                let mut value = Vec::new();
                bytes_field(1, tag.as_bytes(), &mut value);
                value.push(0x15);
                value.extend_from_slice(&v.to_le_bytes());
                bytes_field(1, &value, &mut summary);
            }
            bytes_field(5, &summary, &mut e);
        }
        // SessionLog { status: START (1) }
        Payload::SessionStart => bytes_field(7, &[0x08, 0x01], &mut e),
    }
    e
}

/// An open event file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir` (created if needed). `resumed_at`: the checkpoint step a resumed run continues
    /// from (a `SessionLog START` at the next step makes TensorBoard drop the earlier file's points from there on:
    /// the steps the resumed run redoes).
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let t = now();
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        // Unique per process (two runs of one process within a second): a counter after the pid.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.{host}.{}.{n}.loratune",
            t as u64,
            std::process::id()
        ));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { file, path };
        w.append(&event(t, 0, Payload::FileVersion))?;
        if let Some(step) = resumed_at {
            w.append(&event(t, step as i64 + 1, Payload::SessionStart))?;
        }
        Ok(w)
    }

    /// One step's scalars (`tag`, value), flushed.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.append(&event(now(), step as i64, Payload::Scalars(values)))
    }

    fn append(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(data))
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One event read back: its step, whether it is a `SessionLog START`, and its scalars.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadEvent {
    pub step: i64,
    pub session_start: bool,
    pub scalars: Vec<(String, f32)>,
}

/// A protobuf field: (number, wire type, varint value, bytes of a length-delimited / fixed field).
type Field<'a> = (u64, u8, u64, &'a [u8]);

/// The fields of a protobuf message, in order; `None` when malformed.
fn fields(mut b: &[u8]) -> Option<Vec<Field<'_>>> {
    fn read_varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b)?;
        let (num, wire) = (key >> 3, (key & 7) as u8);
        match wire {
            0 => out.push((num, wire, read_varint(&mut b)?, &b[..0])),
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let (data, rest) = (b.get(..n)?, b.get(n..)?);
                out.push((num, wire, 0, data));
                b = rest;
            }
            2 => {
                let n = read_varint(&mut b)? as usize;
                let (data, rest) = (b.get(..n)?, b.get(n..)?);
                out.push((num, wire, 0, data));
                b = rest;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Read an event file back, checking every record's length and CRCs (what TensorBoard's reader checks).
pub fn read_events(path: &Path) -> Result<Vec<ReadEvent>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |what: &str| Error::Train(format!("{}: {what}", path.display()));
    let mut rest = &bytes[..];
    let mut events = Vec::new();
    while !rest.is_empty() {
        let header = rest
            .get(..12)
            .ok_or_else(|| bad("truncated record header"))?;
        if masked_crc(&header[..8]).to_le_bytes() != header[8..12] {
            return Err(bad("record length CRC mismatch"));
        }
        let n = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
        let data = rest
            .get(12..12 + n)
            .ok_or_else(|| bad("truncated record"))?;
        let crc = rest
            .get(12 + n..16 + n)
            .ok_or_else(|| bad("truncated record CRC"))?;
        if masked_crc(data).to_le_bytes() != crc {
            return Err(bad("record data CRC mismatch"));
        }
        rest = &rest[16 + n..];
        let mut ev = ReadEvent {
            step: 0,
            session_start: false,
            scalars: Vec::new(),
        };
        for (num, _, v, body) in fields(data).ok_or_else(|| bad("malformed Event"))? {
            match num {
                2 => ev.step = v as i64,
                5 => {
                    for (_, _, _, value) in fields(body).ok_or_else(|| bad("malformed Summary"))? {
                        let mut tag = String::new();
                        let mut x = None;
                        for (n, w, _, b) in fields(value).ok_or_else(|| bad("malformed Value"))? {
                            match (n, w) {
                                (1, 2) => tag = String::from_utf8_lossy(b).into_owned(),
                                (2, 5) => {
                                    x = Some(f32::from_le_bytes(b.try_into().expect("4 bytes")))
                                }
                                _ => {}
                            }
                        }
                        if let Some(x) = x {
                            ev.scalars.push((tag, x));
                        }
                    }
                }
                7 => {
                    let status = fields(body).ok_or_else(|| bad("malformed SessionLog"))?;
                    ev.session_start = status.iter().any(|&(n, _, v, _)| n == 1 && v == 1);
                }
                _ => {}
            }
        }
        events.push(ev);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value, and TFRecord's masking of it.
    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// Byte for byte what TensorBoard's own writer produces for the same events (fixture written by
    /// `scripts/reference/tensorboard_fixture.py` with tensorboard 2.21's `event_pb2` and `RecordWriter`).
    #[test]
    fn events_equal_tensorboards_own_encoding() {
        let want = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tensorboard/events.bin"
        ))
        .unwrap();
        let mut got = Vec::new();
        got.extend(record(&event(1_700_000_000.25, 0, Payload::FileVersion)));
        got.extend(record(&event(1_700_000_001.5, 20, Payload::SessionStart)));
        got.extend(record(&event(
            1_700_000_002.75,
            300,
            Payload::Scalars(&[("train/loss", 2.5), ("train/learning_rate", 1e-4)]),
        )));
        assert_eq!(got, want);
        // And read back.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        std::fs::write(&path, &want).unwrap();
        let evs = read_events(&path).unwrap();
        assert_eq!(evs.len(), 3);
        assert!(evs[1].session_start && evs[1].step == 20);
        assert_eq!(evs[2].step, 300);
        assert_eq!(
            evs[2].scalars,
            [
                ("train/loss".to_string(), 2.5),
                ("train/learning_rate".to_string(), 1e-4)
            ]
        );
        // A flipped byte is caught by the CRC.
        let mut bad = want.clone();
        bad[40] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(read_events(&path).is_err());
    }
}
