//! PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin` from `torch.save`) read without running
//! anything from them.
//!
//! Since PyTorch 1.6 such a file is a zip archive (stored, not compressed) holding `data.pkl`,
//! the pickled object, and one entry per tensor storage (`data/0`, `data/1`, ...). Python's
//! unpickler would import and call whatever `data.pkl` names, which is how a checkpoint can run
//! code. Here `data.pkl` is interpreted by a restricted machine: it knows the opcodes that build
//! numbers, strings, tuples, lists and dicts, and calls nothing except the few functions that
//! rebuild tensors and dicts (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`,
//! `collections.OrderedDict`), which it interprets itself. Any other global is refused, naming
//! it. Tensors become byte ranges of the zip file, so the loader reads them one at a time as it
//! reads safetensors, never the whole file.

use std::collections::BTreeMap;

use super::safetensors::{FileDType, Header, TensorEntry};
use super::FileSource;
use crate::error::{Error, Result};

/// Largest `data.pkl` we interpret (an SDXL checkpoint's is a few MB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Largest central directory we read.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Deepest nesting of containers we follow.
const MAX_DEPTH: usize = 256;

/// A value built by the restricted unpickler.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A global the allowlist admits, not yet called.
    Global(Allowed),
    /// A tensor storage: `persistent_load(('storage', type, key, location, numel))`.
    Storage { dtype: FileDType, key: String, numel: u64 },
    /// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
    Tensor { dtype: FileDType, key: String, storage_numel: u64, offset: u64, shape: Vec<usize>, stride: Vec<usize> },
    /// A mark on the stack (MARK opcode).
    Mark,
}

/// The globals a state dict needs; every other one is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    RebuildTensorV2,
    RebuildParameter,
    OrderedDict,
    Storage(FileDType),
}

fn allowed(module: &str, name: &str) -> Option<Allowed> {
    Some(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Allowed::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Allowed::RebuildParameter,
        ("collections", "OrderedDict") => Allowed::OrderedDict,
        ("torch", "FloatStorage") => Allowed::Storage(FileDType::F32),
        ("torch", "HalfStorage") => Allowed::Storage(FileDType::F16),
        ("torch", "BFloat16Storage") => Allowed::Storage(FileDType::BF16),
        ("torch", "DoubleStorage") => Allowed::Storage(FileDType::F64),
        ("torch", "LongStorage") => Allowed::Storage(FileDType::I64),
        ("torch", "IntStorage") => Allowed::Storage(FileDType::I32),
        ("torch", "CharStorage") => Allowed::Storage(FileDType::I8),
        ("torch", "ByteStorage") | ("torch", "BoolStorage") => Allowed::Storage(FileDType::U8),
        _ => return None,
    })
}

fn err(what: &str, why: impl std::fmt::Display) -> Error {
    Error::Model(format!("{what}: {why}"))
}

/// Most value nodes DUP and the memo may copy (a pickle can GET one large object many times, or
/// nest a container in itself by DUP, doubling it each time): some 250 MB of values. A state dict
/// copies about 15 per tensor (SDXL's 2,500 tensors: 40,000).
const MAX_COPIED_NODES: usize = 1 << 22;

/// A stack or memo slot: a value and how deeply it nests (kept shallow, so dropping a value
/// never recurses far).
#[derive(Clone)]
struct Item {
    v: Value,
    depth: usize,
}

/// Nodes of `v` (a string or byte string as one per 64 bytes), counting at most `limit`.
fn nodes(v: &Value, limit: usize) -> usize {
    let mut n = 1;
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Tuple(x) | Value::List(x) => Box::new(x.iter()),
        Value::Dict(x) => Box::new(x.iter().flat_map(|(k, v)| [k, v])),
        Value::Str(t) => return 1 + t.len() / 64,
        Value::Bytes(b) => return 1 + b.len() / 64,
        Value::Storage { key, .. } => return 1 + key.len() / 64,
        Value::Tensor { key, shape, .. } => return 1 + (key.len() + 16 * shape.len()) / 64,
        _ => return 1,
    };
    for c in children {
        if n >= limit {
            break;
        }
        n += nodes(c, limit - n);
    }
    n
}

/// Interprets a pickle with the restricted machine. `what` names the file in messages.
pub fn unpickle(data: &[u8], what: &str) -> Result<Value> {
    let bad = |why: String| err(what, format!("{why}; it is not a checkpoint ldm-web can read safely"));
    let mut pos = 0usize;
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: BTreeMap<u64, Item> = BTreeMap::new();
    let mut copied = 0usize;
    // Counts a copy of `v` before it is made, refusing one past the limit.
    let charge = |copied: &mut usize, v: &Value| -> Result<()> {
        *copied += nodes(v, MAX_COPIED_NODES);
        if *copied >= MAX_COPIED_NODES {
            return Err(err(what, "the pickle copies more objects than a checkpoint has; it is not a checkpoint ldm-web can read safely"));
        }
        Ok(())
    };
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        let end = pos.checked_add(n).filter(|&e| e <= data.len()).ok_or_else(|| err(what, "the pickle ends early (truncated file?)"))?;
        let s = &data[*pos..end];
        *pos = end;
        Ok(s)
    };
    let u32le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| err(what, "a pickled string is not UTF-8"));
    let leaf = |v: Value| Item { v, depth: 0 };
    let pop = |stack: &mut Vec<Item>| stack.pop().ok_or_else(|| err(what, "the pickle pops an empty stack"));
    // Items above the topmost mark, removing the mark.
    let pop_mark = |stack: &mut Vec<Item>| -> Result<Vec<Item>> {
        let m = stack.iter().rposition(|i| i.v == Value::Mark).ok_or_else(|| err(what, "the pickle has no mark to pop to"))?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    // A container of `items`, or an error when it would nest too deeply.
    let container = |items: Vec<Item>, make: fn(Vec<Value>) -> Value| -> Result<Item> {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(err(what, "the pickled object is nested too deeply"));
        }
        Ok(Item { v: make(items.into_iter().map(|i| i.v).collect()), depth })
    };
    // Adds children to the container on top of the stack.
    let extend = |stack: &mut Vec<Item>, items: Vec<Item>, dict: bool| -> Result<()> {
        let top = stack.last_mut().ok_or_else(|| err(what, "adding items to an empty stack"))?;
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(err(what, "the pickled object is nested too deeply"));
        }
        top.depth = top.depth.max(depth);
        match (&mut top.v, dict) {
            (Value::Dict(d), true) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k.v, v.v));
                }
            }
            (Value::List(l), false) => l.extend(items.into_iter().map(|i| i.v)),
            _ => return Err(err(what, format!("adding items to something that is not a {}; it is not a checkpoint ldm-web can read safely", if dict { "dict" } else { "list" }))),
        }
        Ok(())
    };
    let line = |pos: &mut usize| -> Result<String> {
        let rest = &data[(*pos).min(data.len())..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| err(what, "the pickle ends inside a line"))?;
        let s = String::from_utf8(rest[..n].to_vec()).map_err(|_| err(what, "a pickled name is not UTF-8"))?;
        *pos += n + 1;
        Ok(s)
    };
    loop {
        let op = *take(&mut pos, 1)?.first().unwrap_or(&0);
        match op {
            0x80 => {
                take(&mut pos, 1)?;
            }
            0x95 => {
                take(&mut pos, 8)?;
            }
            b'.' => return pop(&mut stack).map(|i| i.v),
            b'(' => stack.push(leaf(Value::Mark)),
            b'}' => stack.push(leaf(Value::Dict(Vec::new()))),
            b']' | 0x8f => stack.push(leaf(Value::List(Vec::new()))),
            b')' => stack.push(leaf(Value::Tuple(Vec::new()))),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(container(items, Value::Tuple)?);
            }
            0x91 => {
                let items = pop_mark(&mut stack)?;
                stack.push(container(items, Value::List)?);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(bad("a tuple opcode finds too few items".into()));
                }
                let items = stack.split_off(stack.len() - n);
                if items.iter().any(|i| i.v == Value::Mark) {
                    return Err(bad("a tuple holds a mark".into()));
                }
                stack.push(container(items, Value::Tuple)?);
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                extend(&mut stack, vec![k, v], true)?;
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                if items.len() % 2 != 0 {
                    return Err(bad("SETITEMS with an odd number of items".into()));
                }
                extend(&mut stack, items, true)?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                extend(&mut stack, vec![v], false)?;
            }
            b'e' | 0x90 => {
                let items = pop_mark(&mut stack)?;
                extend(&mut stack, items, false)?;
            }
            b'q' | b'r' | 0x94 | b'p' => {
                let key = match op {
                    b'q' => take(&mut pos, 1)?[0] as u64,
                    b'r' => u32le(take(&mut pos, 4)?) as u64,
                    b'p' => line(&mut pos)?.trim().parse().map_err(|_| bad("a PUT with a bad index".into()))?,
                    _ => memo.len() as u64,
                };
                // The memo keeps a copy: containers memoised before they are filled (how
                // pickle writes them) read back empty, which no state dict relies on.
                let top = stack.last().ok_or_else(|| bad("memoising an empty stack".into()))?;
                if top.v == Value::Mark {
                    return Err(bad("memoising a mark".into()));
                }
                charge(&mut copied, &top.v)?;
                memo.insert(key, top.clone());
            }
            b'h' | b'j' | b'g' => {
                let key = match op {
                    b'h' => take(&mut pos, 1)?[0] as u64,
                    b'j' => u32le(take(&mut pos, 4)?) as u64,
                    _ => line(&mut pos)?.trim().parse().map_err(|_| bad("a GET with a bad index".into()))?,
                };
                let item = memo.get(&key).ok_or_else(|| bad(format!("memo entry {key} is read before it is written")))?;
                charge(&mut copied, &item.v)?;
                stack.push(item.clone());
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'2' => {
                let top = stack.last().ok_or_else(|| bad("DUP on an empty stack".into()))?;
                charge(&mut copied, &top.v)?;
                let top = top.clone();
                stack.push(top);
            }
            b'J' => stack.push(leaf(Value::Int(i32::from_le_bytes(take(&mut pos, 4)?.try_into().map_err(|_| bad("short int".into()))?) as i64))),
            b'K' => stack.push(leaf(Value::Int(take(&mut pos, 1)?[0] as i64))),
            b'M' => {
                let b = take(&mut pos, 2)?;
                stack.push(leaf(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64)));
            }
            0x8a => {
                let n = take(&mut pos, 1)?[0] as usize;
                let b = take(&mut pos, n)?;
                if n > 8 {
                    return Err(bad(format!("a {n}-byte integer")));
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(leaf(Value::Int(v)));
            }
            b'I' => {
                let s = line(&mut pos)?;
                stack.push(leaf(match s.as_str() {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    t => Value::Int(t.trim().parse().map_err(|_| bad(format!("INT {t:?}")))?),
                }));
            }
            b'G' => stack.push(leaf(Value::Float(f64::from_be_bytes(take(&mut pos, 8)?.try_into().map_err(|_| bad("short float".into()))?)))),
            b'N' => stack.push(leaf(Value::None)),
            0x88 => stack.push(leaf(Value::Bool(true))),
            0x89 => stack.push(leaf(Value::Bool(false))),
            b'X' => {
                let n = u32le(take(&mut pos, 4)?);
                let s = text(take(&mut pos, n)?)?;
                stack.push(leaf(Value::Str(s)));
            }
            0x8c => {
                let n = take(&mut pos, 1)?[0] as usize;
                let s = text(take(&mut pos, n)?)?;
                stack.push(leaf(Value::Str(s)));
            }
            0x8d | 0x8e => {
                let b = take(&mut pos, 8)?;
                let n = usize::try_from(u64::from_le_bytes(b.try_into().map_err(|_| bad("short length".into()))?)).map_err(|_| bad("a huge string".into()))?;
                let raw = take(&mut pos, n)?.to_vec();
                stack.push(leaf(if op == 0x8d { Value::Str(text(&raw)?) } else { Value::Bytes(raw) }));
            }
            b'T' | b'B' => {
                let n = u32le(take(&mut pos, 4)?);
                let raw = take(&mut pos, n)?.to_vec();
                stack.push(leaf(Value::Bytes(raw)));
            }
            b'U' | b'C' => {
                let n = take(&mut pos, 1)?[0] as usize;
                let raw = take(&mut pos, n)?.to_vec();
                stack.push(leaf(Value::Bytes(raw)));
            }
            b'c' | 0x93 => {
                let (module, name) = if op == b'c' {
                    (line(&mut pos)?, line(&mut pos)?)
                } else {
                    let name = pop(&mut stack)?;
                    let module = pop(&mut stack)?;
                    match (module.v, name.v) {
                        (Value::Str(m), Value::Str(n)) => (m, n),
                        _ => return Err(bad("STACK_GLOBAL with names that are not strings".into())),
                    }
                };
                let g = allowed(&module, &name).ok_or_else(|| {
                    err(what, format!("it asks for the Python global {module}.{name}, which a plain tensor checkpoint does not need; ldm-web refuses it rather than run code from the file (convert the file with a tool you trust, e.g. safetensors.torch.save_file(torch.load(f, weights_only=True)[\"state_dict\"], out))"))
                })?;
                stack.push(leaf(Value::Global(g)));
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let Value::Tuple(args) = args.v else { return Err(bad("REDUCE without an argument tuple".into())) };
                stack.push(leaf(call(f.v, args, what)?));
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let top = stack.last_mut().ok_or_else(|| bad("BUILD on an empty stack".into()))?;
                match (&mut top.v, state.v) {
                    (Value::Dict(d), Value::Dict(s)) => {
                        top.depth = top.depth.max(state.depth);
                        d.extend(s);
                    }
                    // A tensor's BUILD state (Python attributes) carries nothing we need.
                    (Value::Tensor { .. }, Value::Dict(s)) if s.is_empty() => {}
                    (Value::Tensor { .. }, Value::Tuple(_)) => {}
                    _ => return Err(bad("BUILD on an object that is not a dict".into())),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(leaf(persistent_load(pid.v, what)?));
            }
            other => {
                return Err(bad(format!("pickle opcode 0x{other:02x} ({:?}) is not allowed", other as char)));
            }
        }
        if stack.len() > 1 << 24 || copied >= MAX_COPIED_NODES {
            return Err(bad("the pickle builds more than a checkpoint holds".into()));
        }
    }
}

/// `persistent_load` of `torch.save`: `('storage', storage_type, key, location, numel)`.
fn persistent_load(pid: Value, what: &str) -> Result<Value> {
    let Value::Tuple(t) = pid else { return Err(err(what, "a persistent id that is not a tuple")) };
    match t.as_slice() {
        [Value::Str(kind), Value::Global(Allowed::Storage(dtype)), key, _location, Value::Int(numel)] if kind == "storage" && *numel >= 0 => {
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => return Err(err(what, "a storage key that is not a string")),
            };
            if key.contains('/') || key.contains("..") {
                return Err(err(what, format!("storage key {key:?} points outside the archive's data folder")));
            }
            Ok(Value::Storage { dtype: *dtype, key, numel: *numel as u64 })
        }
        _ => Err(err(what, "a persistent id that is not a tensor storage")),
    }
}

fn as_dims(v: &Value, what: &str) -> Result<Vec<usize>> {
    let Value::Tuple(t) = v else { return Err(err(what, "a tensor size or stride that is not a tuple")) };
    t.iter().map(|d| match d {
        Value::Int(i) if *i >= 0 => usize::try_from(*i).map_err(|_| err(what, "a tensor dimension too large")),
        _ => Err(err(what, "a negative or non-integer tensor dimension")),
    }).collect()
}

/// Calls an allowed global on `args` (as its Python counterpart would, data only).
fn call(f: Value, args: Vec<Value>, what: &str) -> Result<Value> {
    match f {
        Value::Global(Allowed::OrderedDict) => Ok(Value::Dict(Vec::new())),
        Value::Global(Allowed::RebuildParameter) => args.into_iter().next().ok_or_else(|| err(what, "_rebuild_parameter without a tensor")),
        Value::Global(Allowed::RebuildTensorV2) => {
            if args.len() < 4 {
                return Err(err(what, "_rebuild_tensor_v2 with too few arguments"));
            }
            let Value::Storage { dtype, key, numel } = &args[0] else { return Err(err(what, "_rebuild_tensor_v2 without a storage")) };
            let Value::Int(offset) = args[1] else { return Err(err(what, "_rebuild_tensor_v2 with a bad storage offset")) };
            let shape = as_dims(&args[2], what)?;
            let stride = as_dims(&args[3], what)?;
            if offset < 0 || shape.len() != stride.len() {
                return Err(err(what, "_rebuild_tensor_v2 with a bad offset or stride"));
            }
            Ok(Value::Tensor { dtype: *dtype, key: key.clone(), storage_numel: *numel, offset: offset as u64, shape, stride })
        }
        Value::Global(g) => Err(err(what, format!("{g:?} cannot be called"))),
        _ => Err(err(what, "REDUCE on something that is not an allowed function")),
    }
}

/// One zip entry: where its data starts and how long it is.
#[derive(Clone, Debug)]
struct ZipEntry {
    name: String,
    method: u16,
    size: u64,
    local_offset: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The central directory of the zip file `path` (zip64 included).
async fn zip_entries(src: &dyn FileSource, path: &str, size: u64) -> Result<Vec<ZipEntry>> {
    let what = src.describe(path);
    let trunc = || err(&what, "the zip archive is truncated or damaged (no end-of-directory record); download it again");
    let tail_len = size.min(22 + 65535 + 20);
    let tail = src.read_range(path, size - tail_len, tail_len).await?;
    let eocd = (0..tail.len().saturating_sub(21)).rev().find(|&i| le32(&tail, i) == 0x0605_4b50).ok_or_else(trunc)?;
    let (mut count, mut dir_size, mut dir_offset) = (le16(&tail, eocd + 10) as u64, le32(&tail, eocd + 12) as u64, le32(&tail, eocd + 16) as u64);
    if eocd >= 20 && le32(&tail, eocd - 20) == 0x0706_4b50 {
        let rec_at = le64(&tail, eocd - 20 + 8);
        if rec_at.checked_add(56).is_none_or(|e| e > size) {
            return Err(trunc());
        }
        let rec = src.read_range(path, rec_at, 56).await?;
        if le32(&rec, 0) != 0x0606_4b50 {
            return Err(trunc());
        }
        count = le64(&rec, 32);
        dir_size = le64(&rec, 40);
        dir_offset = le64(&rec, 48);
    }
    if dir_size > MAX_DIRECTORY_BYTES || dir_offset.checked_add(dir_size).is_none_or(|e| e > size) || count > dir_size / 46 + 1 {
        return Err(trunc());
    }
    let dir = src.read_range(path, dir_offset, dir_size).await?;
    let mut entries = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        if at + 46 > dir.len() || le32(&dir, at) != 0x0201_4b50 {
            return Err(trunc());
        }
        let method = le16(&dir, at + 10);
        let (mut csize, mut usize_, mut local) = (le32(&dir, at + 20) as u64, le32(&dir, at + 24) as u64, le32(&dir, at + 42) as u64);
        let (nlen, xlen, clen) = (le16(&dir, at + 28) as usize, le16(&dir, at + 30) as usize, le16(&dir, at + 32) as usize);
        let end = at + 46 + nlen + xlen + clen;
        if end > dir.len() {
            return Err(trunc());
        }
        let name = String::from_utf8_lossy(&dir[at + 46..at + 46 + nlen]).to_string();
        // zip64 extra field: the 8-byte values replace the 0xffffffff ones, in order.
        let mut x = at + 46 + nlen;
        while x + 4 <= at + 46 + nlen + xlen {
            let (id, len) = (le16(&dir, x), le16(&dir, x + 2) as usize);
            if x + 4 + len > at + 46 + nlen + xlen {
                break;
            }
            if id == 1 {
                let mut p = x + 4;
                for v in [&mut usize_, &mut csize, &mut local] {
                    if *v == 0xffff_ffff && p + 8 <= x + 4 + len {
                        *v = le64(&dir, p);
                        p += 8;
                    }
                }
            }
            x += 4 + len;
        }
        if method == 0 && csize != usize_ {
            return Err(trunc());
        }
        entries.push(ZipEntry { name, method, size: csize, local_offset: local });
        at = end;
    }
    Ok(entries)
}

/// Where an entry's data begins (after its local header).
async fn data_start(src: &dyn FileSource, path: &str, e: &ZipEntry, size: u64) -> Result<u64> {
    let what = src.describe(path);
    if e.local_offset.checked_add(30).is_none_or(|end| end > size) {
        return Err(err(&what, format!("zip entry {} lies outside the file (truncated?)", e.name)));
    }
    let h = src.read_range(path, e.local_offset, 30).await?;
    if le32(&h, 0) != 0x0403_4b50 {
        return Err(err(&what, format!("zip entry {} has no local header (damaged file?)", e.name)));
    }
    let start = e.local_offset + 30 + le16(&h, 26) as u64 + le16(&h, 28) as u64;
    if start.checked_add(e.size).is_none_or(|end| end > size) {
        return Err(err(&what, format!("zip entry {} runs past the end of the file (truncated download?)", e.name)));
    }
    Ok(start)
}

/// Whether `prefix` (the file's first bytes) starts a zip archive, as `torch.save` writes.
pub fn is_zip(prefix: &[u8]) -> bool {
    prefix.starts_with(b"PK\x03\x04")
}

/// Whether `prefix` starts a pickle protocol 2+ stream (PyTorch's legacy, pre-1.6 format).
pub fn is_legacy_pickle(prefix: &[u8]) -> bool {
    prefix.first() == Some(&0x80) && prefix.get(1).is_some_and(|&p| (2..=5).contains(&p))
}

/// A `torch.save` zip archive as a safetensors-like header: every tensor in the pickled object,
/// named by its path of dict keys (`state_dict.` dropped, as the checkpoint's state dict is what
/// loaders want), as a byte range of the archive; other leaves (numbers, strings) as metadata.
pub async fn torch_zip_header(src: &dyn FileSource, path: &str, size: u64) -> Result<Header> {
    let what = src.describe(path);
    let entries = zip_entries(src, path, size).await?;
    let pkl = entries.iter().find(|e| e.name.ends_with("/data.pkl") || e.name == "data.pkl").ok_or_else(|| err(&what, "a zip archive without data.pkl is not a PyTorch checkpoint"))?;
    let prefix = pkl.name.strip_suffix("data.pkl").unwrap_or("").to_string();
    if pkl.method != 0 {
        return Err(err(&what, "data.pkl is compressed; torch.save never compresses, so this is not a PyTorch checkpoint"));
    }
    if pkl.size > MAX_PICKLE_BYTES {
        return Err(err(&what, format!("data.pkl is {} bytes, more than a checkpoint's pickle holds", pkl.size)));
    }
    let start = data_start(src, path, pkl, size).await?;
    let bytes = src.read_range(path, start, pkl.size).await?;
    let root = unpickle(&bytes, &what)?;
    let root = match root {
        Value::Dict(items) => {
            // Lightning checkpoints keep the weights under "state_dict".
            match items.iter().find(|(k, _)| *k == Value::Str("state_dict".into())) {
                Some((_, Value::Dict(sd))) => Value::Dict(sd.clone()),
                _ => Value::Dict(items),
            }
        }
        other => other,
    };
    let mut leaves = Vec::new();
    flatten(&root, String::new(), 0, &mut leaves, &what)?;
    let by_name: BTreeMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut header = Header::default();
    for (name, v) in leaves {
        match v {
            &Value::Tensor { dtype, ref key, storage_numel, offset, ref shape, ref stride } => {
                let e = by_name.get(format!("{prefix}data/{key}").as_str()).ok_or_else(|| err(&what, format!("tensor {name} uses storage {key}, which the archive lacks")))?;
                if e.method != 0 {
                    return Err(err(&what, format!("storage {key} is compressed; torch.save never compresses")));
                }
                let es = dtype.size();
                if e.size < storage_numel.saturating_mul(es) {
                    return Err(err(&what, format!("storage {key} holds {} bytes, less than its {storage_numel} elements (truncated?)", e.size)));
                }
                let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)).ok_or_else(|| err(&what, format!("tensor {name} is too large")))?;
                // Only row-major tensors are byte ranges (state dicts hold those).
                let mut expect = 1usize;
                for (&d, &s) in shape.iter().zip(stride.iter()).rev() {
                    if d != 1 && s != expect {
                        return Err(err(&what, format!("tensor {name} is stored transposed or strided (stride {stride:?} for shape {shape:?}); save it contiguous (tensor.contiguous()) or convert the file to safetensors")));
                    }
                    expect = expect.saturating_mul(d);
                }
                if offset.checked_add(numel).is_none_or(|end| end > storage_numel) {
                    return Err(err(&what, format!("tensor {name} reaches past the end of its storage")));
                }
                let base = data_start(src, path, e, size).await?;
                header.tensors.insert(name, TensorEntry { dtype, shape: shape.clone(), start: base + offset * es, len: numel * es });
            }
            Value::Int(i) => {
                header.metadata.insert(name, i.to_string());
            }
            Value::Float(f) => {
                header.metadata.insert(name, f.to_string());
            }
            Value::Str(s) => {
                header.metadata.insert(name, s.clone());
            }
            Value::Bool(b) => {
                header.metadata.insert(name, b.to_string());
            }
            _ => {}
        }
    }
    Ok(header)
}

/// Leaves of nested dicts and lists, named by their key path joined with `.`.
fn flatten<'v>(v: &'v Value, name: String, depth: usize, out: &mut Vec<(String, &'v Value)>, what: &str) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(err(what, "the pickled object is nested too deeply"));
    }
    let join = |k: &str| if name.is_empty() { k.to_string() } else { format!("{name}.{k}") };
    match v {
        Value::Dict(items) => {
            for (k, x) in items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                flatten(x, join(&key), depth + 1, out, what)?;
            }
        }
        Value::List(items) | Value::Tuple(items) if items.iter().any(|x| matches!(x, Value::Tensor { .. } | Value::Dict(_))) => {
            for (i, x) in items.iter().enumerate() {
                flatten(x, join(&i.to_string()), depth + 1, out, what)?;
            }
        }
        _ => out.push((name, v)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of `{"a": OrderedDict(), "n": 5, "s": "x", "t": (1, -2, 3.5), "big": 2**40}`.
    fn sample() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', 0x8c, 1, b'a'];
        p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        p.extend_from_slice(&[0x8c, 1, b'n', b'K', 5, 0x8c, 1, b's', b'X', 1, 0, 0, 0, b'x', 0x8c, 1, b't', b'K', 1, b'J']);
        p.extend_from_slice(&(-2i32).to_le_bytes());
        p.push(b'G');
        p.extend_from_slice(&3.5f64.to_be_bytes());
        p.extend_from_slice(&[0x87, 0x8c, 3, b'b', b'i', b'g', 0x8a, 6, 0, 0, 0, 0, 0, 1, b'u', b'.']);
        p
    }

    #[test]
    fn builds_data_without_calling_anything() {
        let v = unpickle(&sample(), "t").expect("parses");
        let Value::Dict(d) = v else { panic!("dict") };
        assert_eq!(d[0], (Value::Str("a".into()), Value::Dict(vec![])));
        assert_eq!(d[1].1, Value::Int(5));
        assert_eq!(d[3].1, Value::Tuple(vec![Value::Int(1), Value::Int(-2), Value::Float(3.5)]));
        assert_eq!(d[4].1, Value::Int(1 << 40));
    }

    #[test]
    fn refuses_other_globals_and_opcodes() {
        let evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.";
        let e = unpickle(evil, "evil.ckpt").expect_err("refused").to_string();
        assert!(e.contains("os.system") && e.contains("refuses"), "{e}");
        let e = unpickle(b"\x80\x02cbuiltins\neval\n.", "t").expect_err("refused").to_string();
        assert!(e.contains("builtins.eval"), "{e}");
        // INST and OBJ build arbitrary classes.
        assert!(unpickle(b"(ios\nsystem\n.", "t").is_err());
        assert!(unpickle(b"\x80\x02(o.", "t").is_err());
    }

    /// A dict set into itself by DUP grows threefold per step (found by `scripts/fuzz.sh unpickle`
    /// as an out-of-memory): refused before the copy that passes the limit is made.
    #[test]
    fn self_nesting_copies_are_bounded() {
        let mut bomb = b"\x80\x02}".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"22s");
        }
        bomb.push(b'.');
        let e = unpickle(&bomb, "bomb.pkl").expect_err("refused").to_string();
        assert!(e.contains("copies more objects"), "{e}");
        // A long string copied many times counts by its length.
        let mut strings = b"\x80\x02X\x00\x00\x10\x00".to_vec();
        strings.extend(std::iter::repeat_n(b'a', 1 << 20));
        strings.extend(std::iter::repeat_n(b'2', 300));
        strings.push(b'.');
        assert!(unpickle(&strings, "strings.pkl").expect_err("refused").to_string().contains("copies more objects"));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let good = sample();
        for n in 0..good.len() {
            assert!(unpickle(&good[..n], "t").is_err(), "prefix of {n} bytes");
        }
        // Deterministic byte flips: whatever the result, no panic.
        let mut state = 0x1234_5678u32;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let i = state as usize % b.len();
                b[i] = (state >> 8) as u8;
            }
            let _ = unpickle(&b, "t");
        }
    }
}
