//! Named tensors across one or more safetensors files, read one at a time onto the GPU.

use std::collections::HashMap;

use super::quantised::{self, rule_for, LayerRule, StoredQuant};
use crate::quantise::Calibration;
use super::safetensors::{header_len, parse_header, Header, TensorEntry};
use super::lora::{AdapterSet, AdapterTarget, LowRankFactors};
use super::FileSource;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};

/// One safetensors file's header.
#[derive(Clone)]
pub struct WeightFile {
    pub path: String,
    pub header: Header,
}

impl WeightFile {
    /// Opens a safetensors file, or a PyTorch checkpoint (`torch.save`'s zip format: `.ckpt`,
    /// `.pt`, `.bin`) through the restricted unpickler, which runs nothing from the file; the
    /// format is told by the file's first bytes, not its name.
    pub async fn open_any(src: &dyn FileSource, path: &str) -> Result<Self> {
        let size = src.size(path).await?.ok_or_else(|| Error::Model(format!("{} does not exist", src.describe(path))))?;
        let prefix = src.read_range(path, 0, 8.min(size)).await?;
        if super::pickle::is_zip(&prefix) {
            let header = super::pickle::torch_zip_header(src, path, size).await?;
            return Ok(Self { path: path.to_string(), header });
        }
        if super::pickle::is_legacy_pickle(&prefix) {
            return Err(Error::Model(format!("{} is a PyTorch checkpoint in the legacy format (before PyTorch 1.6), which can only be read by running it; re-save it once with a trusted PyTorch (torch.save(torch.load(f, weights_only=True), out)) or convert it to safetensors", src.describe(path))));
        }
        let lower = path.to_ascii_lowercase();
        let pickle_name = [".ckpt", ".pt", ".pth", ".bin"].iter().any(|e| lower.ends_with(e));
        Self::open(src, path).await.map_err(|e| match e {
            Error::Model(_) if pickle_name => Error::Model(format!("{} is neither a PyTorch checkpoint (a zip archive from torch.save) nor a safetensors file; is it damaged or another format?", src.describe(path))),
            other => other,
        })
    }

    /// Reads and validates the header of the safetensors file `path` (two small range reads).
    pub async fn open(src: &dyn FileSource, path: &str) -> Result<Self> {
        let size = src.size(path).await?.ok_or_else(|| Error::Model(format!("{} does not exist", src.describe(path))))?;
        let prefix = src.read_range(path, 0, 8.min(size)).await?;
        let n = header_len(&prefix, size, &src.describe(path))?;
        let json = src.read_range(path, 8, n).await?;
        let header = parse_header(&json, size, &src.describe(path))?;
        Ok(Self { path: path.to_string(), header })
    }
}

/// Where a model tensor comes from: a file, and a byte range of one of its tensors.
#[derive(Clone, Debug)]
struct Source {
    file: usize,
    /// The tensor's name in the file (quantised tensors are described under it).
    file_name: String,
    entry: TensorEntry,
    /// A 2-D tensor stored transposed (OpenCLIP's `text_projection`, used as `x @ P`).
    transposed: bool,
}

/// Tensors by (diffusers) name, possibly renamed from another layout or sliced out of a fused
/// tensor; read lazily.
pub struct Weights<'s> {
    src: &'s dyn FileSource,
    files: Vec<WeightFile>,
    names: HashMap<String, Source>,
    /// Seed of [`Weights::random`]: every name exists, with values made up on request.
    random: Option<u64>,
}

impl<'s> Weights<'s> {
    /// Every tensor of `files`, under its own name.
    pub fn new(src: &'s dyn FileSource, files: Vec<WeightFile>) -> Self {
        let mut names = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for (k, e) in &f.header.tensors {
                names.insert(k.clone(), Source { file: i, file_name: k.clone(), entry: e.clone(), transposed: false });
            }
        }
        Self { src, files, names, random: None }
    }

    /// A model of made-up weights: every tensor the model asks for exists, with seeded values
    /// scaled as PyTorch initialises layers (benchmarks of real architectures without a download).
    pub fn random(src: &'s dyn FileSource, seed: u64) -> Self {
        Self { src, files: Vec::new(), names: HashMap::new(), random: Some(seed) }
    }

    /// An empty set over the same files, filled with [`Weights::alias`] (for renamed layouts).
    pub fn renamed(src: &'s dyn FileSource, files: Vec<WeightFile>) -> Self {
        Self { src, files, names: HashMap::new(), random: None }
    }

    /// The files' tensors by their names in the files.
    pub fn file_entries(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.files.iter().flat_map(|f| f.header.tensors.iter().map(|(k, e)| (k.as_str(), e)))
    }

    /// Shape of a file tensor (by its name in the file).
    pub fn file_shape(&self, file_name: &str) -> Option<&[usize]> {
        self.files.iter().find_map(|f| f.header.tensors.get(file_name)).map(|e| e.shape.as_slice())
    }

    /// Makes `name` read file tensor `file_name`, or rows `rows` of it (for fused q/k/v).
    pub fn alias(&mut self, name: &str, file_name: &str, rows: Option<(usize, usize)>) -> Result<()> {
        let (file, entry) = self
            .files
            .iter()
            .enumerate()
            .find_map(|(i, f)| f.header.tensors.get(file_name).map(|e| (i, e.clone())))
            .ok_or_else(|| Error::Model(format!("the checkpoint has no tensor {file_name}")))?;
        let entry = match rows {
            None => entry,
            Some((r0, r1)) => {
                let total = *entry.shape.first().unwrap_or(&0);
                if r0 > r1 || r1 > total {
                    return Err(Error::Model(format!("tensor {file_name} of shape {:?} has no rows {r0}..{r1}", entry.shape)));
                }
                let row_bytes = entry.len / total.max(1) as u64;
                let mut shape = entry.shape.clone();
                shape[0] = r1 - r0;
                TensorEntry { dtype: entry.dtype, shape, start: entry.start + r0 as u64 * row_bytes, len: (r1 - r0) as u64 * row_bytes }
            }
        };
        self.names.insert(name.to_string(), Source { file, file_name: file_name.to_string(), entry, transposed: false });
        Ok(())
    }

    /// Makes `name` read the 2-D file tensor `file_name` transposed.
    pub fn alias_transposed(&mut self, name: &str, file_name: &str) -> Result<()> {
        self.alias(name, file_name, None)?;
        if let Some(s) = self.names.get_mut(name) {
            if s.entry.shape.len() != 2 {
                return Err(Error::Model(format!("tensor {file_name} of shape {:?} is not a matrix", s.entry.shape)));
            }
            s.transposed = true;
            s.entry.shape.reverse();
        }
        Ok(())
    }

    /// The values of a source, transposed back to the shape it is read as when it is stored
    /// transposed.
    async fn read_values(&self, s: &Source) -> Result<Vec<f32>> {
        let v = s.entry.dtype.to_f32(&self.read_entry(s, &s.entry).await?);
        if !s.transposed {
            return Ok(v);
        }
        // Stored [c, r], read as [r, c].
        let (r, c) = (s.entry.shape[0], s.entry.shape[1]);
        let mut out = vec![0f32; v.len()];
        for i in 0..r {
            for j in 0..c {
                out[i * c + j] = v[j * r + i];
            }
        }
        Ok(out)
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.random.is_some() || self.names.contains_key(name)
    }

    /// Shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.names.get(name).map(|s| s.entry.shape.as_slice())
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    fn source(&self, name: &str) -> Result<&Source> {
        self.names.get(name).ok_or_else(|| Error::Model(format!("missing tensor {name}; is this the right kind of model?")))
    }

    /// How `name` is stored if `ldm convert` quantised it (checked against its companions).
    fn stored_quant(&self, s: &Source) -> Result<Option<StoredQuant>> {
        let f = &self.files[s.file];
        quantised::lookup(&f.header, &s.file_name, &self.src.describe(&f.path))
    }

    async fn read_entry(&self, s: &Source, e: &TensorEntry) -> Result<Vec<u8>> {
        // A failed or refused read (e.g. bytes whose sha256 disagrees with the manifest) names the tensor.
        self.src.read_range(&self.files[s.file].path, e.start, e.len).await.map_err(|err| match err {
            Error::Io(m) => Error::Io(format!("reading tensor {}: {m}", s.file_name)),
            other => other,
        })
    }

    /// The bytes of a stored quantised tensor in the engine's layout.
    async fn read_quantised(&self, s: &Source, q: &StoredQuant, name: &str) -> Result<Vec<u8>> {
        let values = self.read_entry(s, &q.values).await?;
        let mut params = Vec::new();
        for e in &q.params {
            params.push(self.read_entry(s, e).await?);
        }
        let params: Vec<&[u8]> = params.iter().map(Vec::as_slice).collect();
        q.dtype.join(&q.shape, &values, &params, &format!("quantised tensor {name}"))
    }

    /// Reads `name` as f32 values with its shape (quantised tensors decoded).
    pub async fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let s = self.source(name)?;
        if let Some(q) = self.stored_quant(s)? {
            let bytes = self.read_quantised(s, &q, name).await?;
            return Ok((q.shape.clone(), q.dtype.decode(&q.shape, &bytes)));
        }
        Ok((s.entry.shape.clone(), self.read_values(s).await?))
    }

    fn check_shape(name: &str, got: &[usize], shape: &[usize]) -> Result<()> {
        // Trailing 1s are ignored, as in 1x1 convolutions stored as linears.
        let squeeze = |v: &[usize]| {
            let mut v = v.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if squeeze(got) != squeeze(shape) {
            return Err(Error::Model(format!("tensor {name} has shape {got:?} but the config implies {shape:?}; does config.json belong to these weights?")));
        }
        Ok(())
    }

    /// Reads `name`, checks it has `shape` and returns it as bytes in the layout of a dtype:
    /// a quantised tensor as stored, anything else converted to `dtype`.
    pub async fn tensor_bytes(&self, name: &str, shape: &[usize], dtype: DType) -> Result<(DType, Vec<u8>)> {
        if let Some(seed) = self.random {
            return Ok((dtype, dtype.encode(shape, &random_values(seed, name, shape))));
        }
        let s = self.source(name)?;
        if let Some(q) = self.stored_quant(s)? {
            Self::check_shape(name, &q.shape, shape)?;
            return Ok((q.dtype, self.read_quantised(s, &q, name).await?));
        }
        Self::check_shape(name, &s.entry.shape, shape)?;
        if dtype == DType::F16 && s.entry.dtype == super::safetensors::FileDType::F16 && !s.transposed {
            return Ok((dtype, self.read_entry(s, &s.entry).await?));
        }
        Ok((dtype, dtype.encode(shape, &self.read_values(s).await?)))
    }

    /// Reads `name`, checks it has `shape`, and uploads it as float `dtype` (a stored quantised
    /// tensor is decoded: only Linear and Conv2d weights are read quantised, by [`W::weight`]).
    pub async fn tensor(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (stored, bytes) = self.tensor_bytes(name, shape, dtype).await?;
        if stored == dtype {
            return gpu.upload_bytes(shape, dtype, &bytes);
        }
        gpu.upload(shape, dtype, &stored.decode(shape, &bytes))
    }

    /// A view that prefixes every name with `prefix.`.
    pub fn at<'w>(&'w self, gpu: &'w Gpu, dtype: DType, prefix: &str) -> W<'w, 's> {
        W { weights: self, gpu, dtype, quant: None, layer_rules: None, input_sink: None, calibration: None, log: None, adapters: None, prefix: prefix.to_string() }
    }
}

/// Seeded values for [`Weights::random`]: matrices uniform in ±1/sqrt(fan-in) (PyTorch's
/// default for Linear and Conv2d), 1-D weights near 1 (norm scales), other 1-D tensors near 0.
fn random_values(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let (centre, scale) = match shape {
        [_] if name.ends_with("weight") => (1.0, 0.1),
        [_] => (0.0, 0.02),
        [rows, ..] => (0.0, 1.0 / ((n / (*rows).max(1)).max(1) as f32).sqrt()),
        [] => (0.0, 0.02),
    };
    // splitmix64 over (seed, name, index): cheap, and the same on every platform.
    let mut state = name.bytes().fold(seed ^ 0x9e37_79b9_7f4a_7c15, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            centre + scale * ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// Whether a weight of this shape is worth quantising: a matrix with at least one whole block
/// per row (biases, norms and tiny projections stay float).
pub fn quantisable(shape: &[usize]) -> bool {
    shape.len() >= 2 && shape[0] > 0 && shape.iter().product::<usize>() / shape[0] >= 32
}

/// One tensor a model read while loading: the component folder it came from, its name and
/// shape, and the bytes the model used, in `dtype` (quantised, or the activation dtype).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightRecord {
    pub folder: &'static str,
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub bytes: Vec<u8>,
    /// The file stored it as f16 (so f16 loses nothing).
    pub source_f16: bool,
}

/// What models read while loading, in order of first use (how `ldm convert` writes them).
#[derive(Clone, Debug, Default)]
pub struct WeightLog(std::rc::Rc<std::cell::RefCell<Vec<WeightRecord>>>);

impl WeightLog {
    /// The records so far, each tensor once (at its first use).
    pub fn records(&self) -> Vec<WeightRecord> {
        let mut seen = std::collections::HashSet::new();
        self.0.borrow().iter().filter(|r| seen.insert((r.folder, r.name.clone()))).cloned().collect()
    }
    /// Bytes of the distinct tensors read from component `folder`.
    pub fn bytes(&self, folder: &str) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.0.borrow().iter().filter(|r| r.folder == folder && seen.insert(r.name.clone())).map(|r| r.bytes.len() as u64).sum()
    }
}

/// How a probed layer reads its input, so an [`InputSink`] can form the vectors its weight
/// multiplies.
#[derive(Clone, Copy, Debug)]
pub enum InputLayout {
    /// Rows of K values (a Linear on tokens `[.., K]`).
    Rows,
    /// A channels-first map `[B, K, N]`, one input vector per position.
    ChannelsFirst,
    /// A convolution's input `[B, C, H, W]`, one input vector per output position (its patch).
    Conv { kernel: (usize, usize), stride: (usize, usize), padding: (usize, usize), dilation: (usize, usize) },
}

/// Receives the inputs of probed Linear and Conv2d layers during a calibration run
/// (implemented above the loader: `models::calibration::InputRecorder`).
pub trait InputSink: std::fmt::Debug {
    /// Layer `names` (`folder/tensor`, several for fused projections) was applied to `x`.
    fn observe(&self, gpu: &Gpu, names: &[String], x: &Tensor, layout: InputLayout) -> Result<()>;
}

/// A layer's connection to an [`InputSink`].
#[derive(Clone)]
pub struct InputProbe {
    sink: std::rc::Rc<dyn InputSink>,
    pub names: Vec<String>,
}

impl InputProbe {
    /// Reports input `x` of the layer.
    pub fn observe(&self, gpu: &Gpu, x: &Tensor, layout: InputLayout) -> Result<()> {
        self.sink.observe(gpu, &self.names, x, layout)
    }
    /// One probe for layers fused from several (q, k and v from one input).
    pub fn fused(parts: Vec<Option<InputProbe>>) -> Option<InputProbe> {
        let mut it = parts.into_iter().flatten();
        let mut first = it.next()?;
        for p in it {
            first.names.extend(p.names);
        }
        Some(first)
    }
}

/// A prefixed view of [`Weights`] that uploads in one dtype (like a VarBuilder).
#[derive(Clone)]
pub struct W<'w, 's> {
    weights: &'w Weights<'s>,
    pub gpu: &'w Gpu,
    pub dtype: DType,
    /// Quantised type for Linear and Conv2d weights read by [`W::weight`] (`None`: `dtype`).
    pub quant: Option<DType>,
    /// Per-layer rules that override `quant`, with the component folder they match against.
    layer_rules: Option<(std::rc::Rc<[LayerRule]>, &'static str)>,
    /// Where Linear / Conv2d layers report their inputs (a calibration run), and the folder.
    input_sink: Option<(std::rc::Rc<dyn InputSink>, &'static str)>,
    /// Input statistics that choose quantised weights' blocks (`ldm convert --calibrate`).
    calibration: Option<(std::rc::Rc<Calibration>, &'static str)>,
    log: Option<(WeightLog, &'static str)>,
    /// LoRA adapters for the component this view reads.
    adapters: Option<(std::rc::Rc<AdapterSet>, AdapterTarget)>,
    prefix: String,
}

impl<'w, 's> W<'w, 's> {
    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
    /// The prefix this view reads under, for messages.
    pub fn describe(&self) -> &str {
        if self.prefix.is_empty() { "model" } else { &self.prefix }
    }
    /// The view under `prefix.sub`.
    pub fn sub(&self, sub: impl std::fmt::Display) -> Self {
        Self { prefix: self.name(&sub.to_string()), ..self.clone() }
    }
    /// Tensor `name` with the expected shape.
    pub async fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.log.is_none() {
            return self.weights.tensor(self.gpu, &self.name(name), shape, self.dtype).await;
        }
        let (stored, bytes) = self.weights.tensor_bytes(&self.name(name), shape, self.dtype).await?;
        let data = stored.decode(shape, &bytes);
        self.record(name, shape, self.dtype, &self.dtype.encode(shape, &data));
        self.gpu.upload(shape, self.dtype, &data)
    }
    /// The same view with Linear and Conv2d weights quantised to `quant` (a quantised type).
    pub fn with_quant(self, quant: Option<DType>) -> Self {
        Self { quant: quant.filter(|q| q.is_quantised()), ..self }
    }
    /// The same view with per-layer `rules` (matched as `folder/name`) overriding its quantisation.
    pub fn with_layer_rules(self, rules: &std::rc::Rc<[LayerRule]>, folder: &'static str) -> Self {
        Self { layer_rules: (!rules.is_empty()).then(|| (rules.clone(), folder)), ..self }
    }
    /// The same view with its Linear / Conv2d layers reporting their inputs to `sink` (as
    /// `folder/name`).
    pub fn with_input_sink(self, sink: Option<&std::rc::Rc<dyn InputSink>>, folder: &'static str) -> Self {
        Self { input_sink: sink.map(|s| (s.clone(), folder)), ..self }
    }
    /// The same view quantising weights with `calibration`'s statistics where it has them.
    pub fn with_calibration(self, calibration: Option<&std::rc::Rc<Calibration>>, folder: &'static str) -> Self {
        Self { calibration: calibration.map(|c| (c.clone(), folder)), ..self }
    }
    /// The probe for the layer whose weight is `name` under this view, during calibration.
    pub fn input_probe(&self, name: &str) -> Option<InputProbe> {
        self.input_sink.as_ref().map(|(sink, folder)| InputProbe { sink: sink.clone(), names: vec![format!("{folder}/{}", self.name(name))] })
    }
    /// The same view with the LoRA adapters of component `folder` (`unet`, `text_encoder`,
    /// `text_encoder_2`; others get none).
    pub fn with_adapters(self, adapters: Option<&std::rc::Rc<AdapterSet>>, folder: &str) -> Self {
        let adapters = adapters.filter(|a| !a.is_empty()).and_then(|a| AdapterTarget::from_folder(folder).map(|t| (a.clone(), t)));
        Self { adapters, ..self }
    }
    /// The low-rank factors the adapters add to this view's layer (weight `shape`), unless
    /// they are merged into its weight or none targets it.
    pub async fn low_rank(&self, shape: &[usize]) -> Result<Option<LowRankFactors>> {
        match &self.adapters {
            Some((a, t)) if !a.merge => a.factors(*t, &self.prefix, shape).await,
            _ => Ok(None),
        }
    }
    /// The same view recording every tensor read into `log`, as from component `folder`.
    pub fn logged(self, log: Option<&WeightLog>, folder: &'static str) -> Self {
        Self { log: log.map(|l| (l.clone(), folder)), ..self }
    }
    fn record(&self, name: &str, shape: &[usize], dtype: DType, bytes: &[u8]) {
        if let Some((log, folder)) = &self.log {
            let name = self.name(name);
            let source_f16 = self.weights.names.get(&name).is_some_and(|s| s.entry.dtype == super::safetensors::FileDType::F16);
            log.0.borrow_mut().push(WeightRecord { folder, name, shape: shape.to_vec(), dtype, bytes: bytes.to_vec(), source_f16 });
        }
    }
    /// The dtype [`W::weight`] gives weight `name` of `shape` if it is not stored quantised: a
    /// matching layer rule's, else this view's quantisation (float rules keep the activation dtype).
    pub fn weight_dtype(&self, name: &str, shape: &[usize]) -> DType {
        let rule = self.layer_rules.as_ref().and_then(|(rules, folder)| rule_for(rules, folder, &self.name(name)));
        match rule.or(self.quant) {
            Some(q) if q.is_quantised() && quantisable(shape) => q,
            _ => self.dtype,
        }
    }
    /// A Linear or Conv2d weight `name` as bytes: stored quantised as is, else quantised by this
    /// view's policy, else in the activation dtype.
    pub async fn weight_bytes(&self, name: &str, shape: &[usize]) -> Result<(DType, Vec<u8>)> {
        let target = self.weight_dtype(name, shape);
        let stats = self.calibration.as_ref().filter(|_| target.is_quantised()).and_then(|(c, folder)| c.get(&format!("{folder}/{}", self.name(name))));
        let (dtype, bytes) = match stats {
            // Calibrated: the float weight quantised with its layer's input statistics (a
            // weight stored quantised stays as it is).
            Some(stats) => match self.weights.tensor_bytes(&self.name(name), shape, DType::F32).await? {
                (DType::F32, raw) => {
                    let data = DType::F32.decode(shape, &raw);
                    (target, crate::quantise::encode_calibrated(target, shape, &data, stats)?)
                }
                stored => stored,
            },
            None => self.weights.tensor_bytes(&self.name(name), shape, target).await?,
        };
        // Merged adapters: W + up . down, only into float weights (merging into quantised
        // weights would lose the adapter to rounding).
        let merged = match &self.adapters {
            Some((a, t)) if a.merge && name == "weight" => a.factors(*t, &self.prefix, shape).await?,
            _ => None,
        };
        let (dtype, bytes) = match merged {
            None => (dtype, bytes),
            Some(_) if dtype.is_quantised() => {
                return Err(Error::Input(format!("cannot merge a LoRA into the quantised weight {} ({}); run it beside the weights instead (without --lora-merge) or use a float model", self.name(name), dtype.name())));
            }
            Some(f) => {
                let mut w = dtype.decode(shape, &bytes);
                for (x, d) in w.iter_mut().zip(f.delta()) {
                    *x += d;
                }
                (dtype, dtype.encode(shape, &w))
            }
        };
        self.record(name, shape, dtype, &bytes);
        Ok((dtype, bytes))
    }
    /// A Linear or Conv2d weight `name` on the GPU (see [`W::weight_bytes`]).
    pub async fn weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (dtype, bytes) = self.weight_bytes(name, shape).await?;
        self.gpu.upload_bytes(shape, dtype, &bytes)
    }
    /// Tensor `name` as f32 values on the CPU, checked against `shape`.
    pub async fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = self.name(name);
        let (got, data) = match self.weights.random {
            Some(seed) => (shape.to_vec(), random_values(seed, &full, shape)),
            None => self.weights.read_f32(&full).await?,
        };
        if got.iter().product::<usize>() != shape.iter().product::<usize>() {
            return Err(Error::Model(format!("tensor {full} has shape {got:?} but the config implies {shape:?}; does config.json belong to these weights?")));
        }
        if self.log.is_some() {
            self.record(name, &got, DType::F32, &DType::F32.encode(&got, &data));
        }
        Ok(data)
    }
    /// Tensor `name` if present.
    pub async fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).await.map(Some)
        } else {
            Ok(None)
        }
    }
    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.name(name))
    }
    /// Shape of `name` under this prefix.
    pub fn shape(&self, name: &str) -> Option<&'w [usize]> {
        self.weights.shape(&self.name(name))
    }
}
