//! The PyO3 bindings: conversion and GIL release only. All decisions about dtypes, devices and layouts
//! are made in Python; this edge is strict and says what it expected when it refuses.

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, StateElem};
use crate::error::{ErrorKind, GrabError};
use crate::mean_balance::MeanBalance;
use crate::pair_balance::PairBalance;
use crate::projection::{ProjectionSpec, SketchKind};
use crate::recursive_balance::RecursiveBalance;
use crate::recursive_pair::RecursivePairBalance;
use crate::sampler::{
    Balance, Config, OrderingKind, Sampler, SamplerState, StateParts, ORDERING_NAMES,
};
use crate::sketch_rows::NormStats;
use crate::stored_gradients::StoredGradients;
use half::{bf16, f16};
use ndarray::ArrayView2;
use numpy::{
    Element, IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArrayDyn, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySlice};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Mutex, OnceLock};

pyo3::create_exception!(
    _native,
    GraBError,
    PyValueError,
    "Base class of every error torchgrab raises."
);
pyo3::create_exception!(
    _native,
    ShapeError,
    GraBError,
    "Gradients or indices of the wrong shape or row count."
);
pyo3::create_exception!(
    _native,
    NonFiniteGradientError,
    GraBError,
    "A gradient holds NaN or Inf; the step was refused."
);
pyo3::create_exception!(
    _native,
    UnitIndexError,
    GraBError,
    "Indices out of range, repeated, or already balanced this epoch."
);
pyo3::create_exception!(
    _native,
    CallOrderError,
    GraBError,
    "A call that does not fit the sampler's lifecycle."
);
pyo3::create_exception!(
    _native,
    StateDictError,
    GraBError,
    "A configuration or state dict that does not fit this sampler."
);
pyo3::create_exception!(
    _native,
    MemoryLimitError,
    GraBError,
    "A request that would need more memory than is available."
);
pyo3::create_exception!(
    _native,
    UnsupportedInputError,
    GraBError,
    "A gradient dtype, device or memory layout torchgrab does not take."
);

fn to_py(e: GrabError) -> PyErr {
    let msg = e.message;
    match e.kind {
        ErrorKind::Shape => ShapeError::new_err(msg),
        ErrorKind::NonFinite => NonFiniteGradientError::new_err(msg),
        ErrorKind::Index => UnitIndexError::new_err(msg),
        ErrorKind::CallOrder => CallOrderError::new_err(msg),
        ErrorKind::State => StateDictError::new_err(msg),
        ErrorKind::Memory => MemoryLimitError::new_err(msg),
    }
}

enum AnySampler {
    F32(Sampler<f32>),
    F64(Sampler<f64>),
}

macro_rules! with_sampler {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            AnySampler::F32($s) => $body,
            AnySampler::F64($s) => $body,
        }
    };
}

/// The native state of one GraBSampler. Use `torchgrab.GraBSampler`; this class is its engine.
#[pyclass(name = "NativeSampler", module = "torchgrab._native")]
struct NativeSampler {
    slot: Slot,
    /// Bumped by every call that may change the state: a cached state dict is current while it is equal.
    mutations: u64,
    export: ExportCache,
}

/// Where the sampler is: here, or lent to a step running on a rayon worker (`step_start`).
enum Slot {
    Here(Box<AnySampler>),
    Lent(Lent),
    /// Only while a method moves the sampler between the two (or if a worker never sent it back).
    Gone,
}

/// A step running in the background. The worker owns the sampler and sends it back with the step's
/// result; `keep` holds the gradient arrays it reads, so they outlive it (the caller promises not to
/// write to them meanwhile, as with torch's `non_blocking=True`).
struct Lent {
    /// In a Mutex only because a pyclass must be Sync; one thread uses it, with `&mut` access.
    done: Mutex<Receiver<Returned>>,
    keep: Vec<Py<PyAny>>,
}

/// What a worker sends back: the sampler it was lent, and the step's result.
type Returned = (Box<AnySampler>, Result<(), GrabError>);

/// Gradient segments as addresses, to cross to the worker: (address, rows, width) of C-contiguous
/// arrays that `Lent::keep` keeps alive.
struct RawBatch<G> {
    segments: Vec<(usize, usize, usize)>,
    _elem: PhantomData<G>,
}

impl<G: GradElem> RawBatch<G> {
    fn of(views: &[ArrayView2<'_, G>]) -> Result<Self, GrabError> {
        Batch::from_views(views)?; // the same checks as a blocking step, here, before anything is lent
        let segments = views
            .iter()
            .map(|v| (v.as_ptr() as usize, v.nrows(), v.ncols()))
            .collect();
        Ok(RawBatch {
            segments,
            _elem: PhantomData,
        })
    }

    /// SAFETY: the arrays behind the addresses must be alive and unwritten while the views are used.
    unsafe fn views(&self) -> Vec<ArrayView2<'_, G>> {
        self.segments
            .iter()
            .map(|&(addr, rows, width)| {
                let data = unsafe { std::slice::from_raw_parts(addr as *const G, rows * width) };
                ArrayView2::from_shape((rows, width), data).expect("rows x width elements")
            })
            .collect()
    }
}

/// The thread background steps run on: a pool of one, so that a background step takes one core (the
/// one the training loop leaves free) and its passes, which would fork across the global pool from
/// d = PARALLEL_MIN_DIM, stay on it; the global pool's workers, which spin for a while after each
/// job, then stay asleep beside the training thread. Results do not depend on the thread count.
fn background_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "torchgrab-step".into())
            .build()
            .ok()
    })
    .as_ref()
}

/// Run `work` (a step) on the sampler in the background; the sampler and the result come back through
/// the receiver.
fn lend(
    mut sampler: Box<AnySampler>,
    work: impl FnOnce(&mut AnySampler) -> Result<(), GrabError> + Send + 'static,
) -> Receiver<Returned> {
    let (tx, rx) = sync_channel(1);
    let job = move || {
        let result = catch_unwind(AssertUnwindSafe(|| work(&mut sampler))).unwrap_or_else(|_| {
            Err(GrabError::new(
                ErrorKind::State,
                "internal error: the background step panicked; the sampler's state may be inconsistent, load a checkpoint",
            ))
        });
        let _ = tx.send((sampler, result)); // the receiver is gone only if the NativeSampler was dropped
    };
    if !crate::kernels::threads_usable() {
        job(); // a forked child: the pools' threads are gone, so the step runs here (blocking)
    } else {
        match background_pool() {
            Some(pool) => pool.spawn(job),
            None => rayon::spawn(job), // no thread for a pool of its own: the global pool
        }
    }
    rx
}

fn array_views<'py, G: GradElem + Element>(
    segments: &'py [PyReadonlyArray2<'py, G>],
) -> Vec<ArrayView2<'py, G>> {
    segments.iter().map(|a| a.as_array()).collect()
}

fn extract_segments<'py, G: Element>(
    segments: &[Bound<'py, PyAny>],
    dtype: &str,
) -> PyResult<Vec<PyReadonlyArray2<'py, G>>> {
    segments
        .iter()
        .enumerate()
        .map(|(k, s)| {
            s.extract::<PyReadonlyArray2<'py, G>>().map_err(|_| {
                UnsupportedInputError::new_err(format!(
                    "gradient segment {k} is not a 2-D {dtype} array"
                ))
            })
        })
        .collect()
}

/// Reinterpret u16 bit patterns as f16 / bf16 without copying.
fn reinterpret_u16<'a, H: GradElem>(view: ArrayView2<'a, u16>) -> PyResult<ArrayView2<'a, H>> {
    let shape = view.dim();
    let slice = view.to_slice().ok_or_else(|| {
        UnsupportedInputError::new_err("16-bit gradient segments must be C-contiguous")
    })?;
    // SAFETY: H is half::f16 or half::bf16, both #[repr(transparent)] over u16, so the slice has the same
    // size, alignment and validity; every u16 bit pattern is a valid f16/bf16.
    let cast: &'a [H] =
        unsafe { std::slice::from_raw_parts(slice.as_ptr() as *const H, slice.len()) };
    ArrayView2::from_shape(shape, cast).map_err(|e| ShapeError::new_err(e.to_string()))
}

fn step_typed<S: StateElem + Send, G: GradElem>(
    py: Python<'_>,
    sampler: &mut Sampler<S>,
    views: &[ArrayView2<'_, G>],
    indices: &[u32],
) -> PyResult<()> {
    let batch = Batch::from_views(views).map_err(to_py)?;
    py.detach(|| sampler.step(&batch, indices)).map_err(to_py)
}

fn step_any<G: GradElem>(
    py: Python<'_>,
    inner: &mut AnySampler,
    views: &[ArrayView2<'_, G>],
    indices: &[u32],
) -> PyResult<()> {
    with_sampler!(inner, s => step_typed(py, s, views, indices))
}

#[pymethods]
impl NativeSampler {
    #[new]
    #[pyo3(signature = (ordering, n, seed, first_epoch_random=true, random_signs=false, delta=0.1, state_dtype="float32", fixed_order=None, depth=5, rounds=1, projection=None, max_memory=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        ordering: &str,
        n: usize,
        seed: u64,
        first_epoch_random: bool,
        random_signs: bool,
        delta: f64,
        state_dtype: &str,
        fixed_order: Option<PyReadonlyArray1<'_, u32>>,
        depth: u32,
        rounds: u32,
        projection: Option<(String, usize)>,
        max_memory: Option<u64>,
    ) -> PyResult<Self> {
        let kind = OrderingKind::parse(ordering).map_err(to_py)?;
        let mut cfg = Config::new(kind, n, seed);
        cfg.first_epoch_random = first_epoch_random;
        cfg.random_signs = random_signs;
        cfg.delta = delta;
        cfg.fixed_order = fixed_order.map(|o| o.as_array().to_vec());
        cfg.depth = depth;
        cfg.rounds = rounds;
        cfg.projection = projection_spec(projection).map_err(to_py)?;
        cfg.max_memory = max_memory;
        let inner = match state_dtype {
            "float32" => AnySampler::F32(Sampler::new(cfg).map_err(to_py)?),
            "float64" => AnySampler::F64(Sampler::new(cfg).map_err(to_py)?),
            other => {
                return Err(UnsupportedInputError::new_err(format!(
                    "state dtype must be float32 or float64, got {other}"
                )))
            }
        };
        Ok(NativeSampler::wrap(inner))
    }

    /// Close the running epoch (if any), start epoch `epoch`, and return its order (uint32).
    fn begin_epoch<'py>(
        &mut self,
        py: Python<'py>,
        epoch: u64,
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        let sampler = self.sampler(py)?;
        let order: Vec<u32> =
            with_sampler!(sampler, s => py.detach(|| s.begin_epoch(epoch).to_vec()));
        self.mutations += 1;
        Ok(order.into_pyarray(py))
    }

    /// Feed one step of gradients: `segments` are C-contiguous 2-D arrays (B x d_k) of one dtype
    /// ("float32", "float64", or "float16"/"bfloat16" as uint16 bit patterns); row r is unit indices[r].
    fn step(
        &mut self,
        py: Python<'_>,
        segments: Vec<Bound<'_, PyAny>>,
        dtype: &str,
        indices: PyReadonlyArray1<'_, u32>,
    ) -> PyResult<()> {
        self.step_with(py, &segments, dtype, &indices, false)
    }

    /// `step`, run on a rayon worker: the input is checked here, then the call returns while the
    /// kernel runs. The arrays must stay alive and unwritten until `wait_step` (or any other call,
    /// which waits first); the step's error, if the kernel refuses it, is raised by that call.
    fn step_start(
        &mut self,
        py: Python<'_>,
        segments: Vec<Bound<'_, PyAny>>,
        dtype: &str,
        indices: PyReadonlyArray1<'_, u32>,
    ) -> PyResult<()> {
        self.step_with(py, &segments, dtype, &indices, true)
    }

    /// `step` on the rows whose factors are `factors` (float32, C-contiguous, rows x (p + q)): row r is
    /// vec(f[r, :p] f[r, p:]^T), then f[r, :p] with `bias` (`Sampler::step_outer`: formed a few rows at
    /// a time where they are balanced; watch()'s lone Linear layer). `background`: as `step_start`.
    #[pyo3(signature = (factors, p, bias, indices, background=false))]
    fn step_outer(
        &mut self,
        py: Python<'_>,
        factors: Bound<'_, PyAny>,
        p: usize,
        bias: bool,
        indices: PyReadonlyArray1<'_, u32>,
        background: bool,
    ) -> PyResult<()> {
        if with_sampler!(&*self.sampler(py)?, s => s.config().kind.balances()) {
            self.mutations += 1;
        }
        let idx = indices.as_slice().map_err(|_| {
            UnsupportedInputError::new_err("indices must be a contiguous uint32 array")
        })?;
        let keep = [factors];
        let arrays = extract_segments::<f32>(&keep, "float32")?;
        let view = arrays[0].as_array();
        if !background {
            let sampler = self.sampler(py)?;
            return with_sampler!(sampler, s => py.detach(|| s.step_outer(view, p, bias, idx)))
                .map_err(to_py);
        }
        self.sampler(py)?;
        // Checked here, so that a malformed call raises now and lends nothing.
        let raw = RawBatch::of(&[view]).map_err(to_py)?;
        if p == 0 || p > view.ncols() || idx.len() != view.nrows() {
            return Err(ShapeError::new_err(format!(
                "step_outer: {} x {} factors split after column {p}, {} indices",
                view.nrows(),
                view.ncols(),
                idx.len()
            )));
        }
        let indices = idx.to_vec();
        self.lend_step(&keep, move |s| {
            // SAFETY: as in `run_step`: `Lent::keep` holds the array until the result is received.
            let views = unsafe { raw.views() };
            with_sampler!(s, s => s.step_outer(views[0].view(), p, bias, &indices))
        })
    }

    /// Wait for a step started by `step_start`, if any; raise its error if the kernel refused it
    /// (the sampler is then as before that step: a step is all or nothing).
    fn wait_step(&mut self, py: Python<'_>) -> PyResult<()> {
        self.sampler(py).map(|_| ())
    }

    /// A step started by `step_start` has not been waited for yet.
    #[getter]
    fn busy(&self) -> bool {
        matches!(self.slot, Slot::Lent(_))
    }

    /// The on-device path's step: `u` (B) and `gram` (B x B, row-major) are the inner products of the
    /// step's rows, computed where the gradients live; returns eps * scale per row (float64), the
    /// coefficient of that row in the running-sum update. Row r is unit indices[r] (`grab`) or the pair indices[2r], indices[2r+1] (`pair`);
    /// `also_fresh` are units held back (checked, not placed).
    fn step_gram<'py>(
        &mut self,
        py: Python<'py>,
        indices: PyReadonlyArray1<'py, u32>,
        u: PyReadonlyArray1<'py, f64>,
        gram: PyReadonlyArray2<'py, f64>,
        dim: usize,
        also_fresh: PyReadonlyArray1<'py, u32>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let sampler = self.sampler(py)?;
        let contiguous = |what: &str| {
            UnsupportedInputError::new_err(format!("{what} must be a contiguous array"))
        };
        let idx = indices.as_slice().map_err(|_| contiguous("indices"))?;
        let extra = also_fresh
            .as_slice()
            .map_err(|_| contiguous("also_fresh"))?;
        let u = u.as_slice().map_err(|_| contiguous("u"))?;
        let g = gram.as_slice().map_err(|_| contiguous("gram"))?;
        let dec = with_sampler!(sampler, s => py.detach(|| s.step_gram(idx, u, g, dim, extra)));
        self.mutations += 1;
        let dec = dec.map_err(to_py)?;
        let coef: Vec<f64> = dec.iter().map(|d| d.0 * d.1).collect();
        Ok(coef.into_pyarray(py))
    }

    /// The running epoch's order (uint32; empty before the first epoch).
    fn current_order<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u32>>> {
        Ok(with_sampler!(self.sampler(py)?, s => PyArray1::from_slice(py, s.current())))
    }

    #[getter]
    fn epochs_begun(&mut self, py: Python<'_>) -> PyResult<u64> {
        Ok(with_sampler!(self.sampler(py)?, s => s.epochs_begun()))
    }

    #[getter]
    fn epoch(&mut self, py: Python<'_>) -> PyResult<u64> {
        Ok(with_sampler!(self.sampler(py)?, s => s.epoch()))
    }

    #[getter]
    fn dim(&mut self, py: Python<'_>) -> PyResult<Option<usize>> {
        Ok(with_sampler!(self.sampler(py)?, s => s.dim()))
    }

    #[getter]
    fn ordering(&mut self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(with_sampler!(self.sampler(py)?, s => s.config().kind.name()))
    }

    #[getter]
    fn n(&mut self, py: Python<'_>) -> PyResult<usize> {
        Ok(with_sampler!(self.sampler(py)?, s => s.config().n))
    }

    /// Bytes held by the ordering state (orders, bitmaps, running sums).
    fn state_bytes(&mut self, py: Python<'_>) -> PyResult<usize> {
        Ok(with_sampler!(self.sampler(py)?, s => state_bytes(s)))
    }

    /// How many calls that may change the state this sampler has seen (steps, epochs).
    #[getter]
    fn mutations(&self) -> u64 {
        self.mutations
    }

    /// The complete state as a dict of ints, floats, strings and NumPy arrays. The O(n) arrays are
    /// read-only in spirit: views of per-epoch buffers that later steps never write (see ExportCache).
    fn state<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.sampler(py)?;
        let (Slot::Here(sampler), cache) = (&self.slot, &mut self.export) else {
            return Err(lost());
        };
        match &**sampler {
            AnySampler::F32(s) => export(py, s.state_parts(), cache, "float32"),
            AnySampler::F64(s) => export(py, s.state_parts(), cache, "float64"),
        }
    }

    /// Rebuild from `state()`'s dict, refusing anything inconsistent.
    #[staticmethod]
    fn from_state(state: &Bound<'_, PyDict>) -> PyResult<Self> {
        let dtype: String = get(state, "state_dtype")?;
        let inner = match dtype.as_str() {
            "float32" => {
                AnySampler::F32(Sampler::import_state(import::<f32>(state)?).map_err(to_py)?)
            }
            "float64" => {
                AnySampler::F64(Sampler::import_state(import::<f64>(state)?).map_err(to_py)?)
            }
            other => {
                return Err(StateDictError::new_err(format!(
                    "state dtype must be float32 or float64, got {other}"
                )))
            }
        };
        Ok(NativeSampler::wrap(inner))
    }
}

impl NativeSampler {
    fn wrap(inner: AnySampler) -> Self {
        NativeSampler {
            slot: Slot::Here(Box::new(inner)),
            mutations: 0,
            export: ExportCache::default(),
        }
    }

    /// The sampler, after waiting for a step lent to a worker (whose refusal is returned here, with
    /// the sampler back in place and unchanged by it).
    fn sampler(&mut self, py: Python<'_>) -> PyResult<&mut AnySampler> {
        if let Slot::Lent(_) = self.slot {
            let Slot::Lent(lent) = std::mem::replace(&mut self.slot, Slot::Gone) else {
                return Err(lost());
            };
            let done = lent.done.into_inner().unwrap_or_else(|e| e.into_inner());
            let back = py.detach(move || done.recv());
            drop(lent.keep); // the worker is done with the arrays
            let (sampler, result) = back.map_err(|_| lost())?;
            self.slot = Slot::Here(sampler);
            result.map_err(to_py)?;
        }
        match &mut self.slot {
            Slot::Here(s) => Ok(&mut **s),
            _ => Err(lost()),
        }
    }

    fn step_with(
        &mut self,
        py: Python<'_>,
        segments: &[Bound<'_, PyAny>],
        dtype: &str,
        indices: &PyReadonlyArray1<'_, u32>,
        background: bool,
    ) -> PyResult<()> {
        // Orderings without gradients ignore steps: their cached state dict stays valid.
        if with_sampler!(&*self.sampler(py)?, s => s.config().kind.balances()) {
            self.mutations += 1;
        }
        let idx = indices.as_slice().map_err(|_| {
            UnsupportedInputError::new_err("indices must be a contiguous uint32 array")
        })?;
        match dtype {
            "float32" => {
                let arrays = extract_segments::<f32>(segments, dtype)?;
                self.run_step(py, &array_views(&arrays), idx, segments, background)
            }
            "float64" => {
                let arrays = extract_segments::<f64>(segments, dtype)?;
                self.run_step(py, &array_views(&arrays), idx, segments, background)
            }
            "float16" | "bfloat16" => {
                let arrays = extract_segments::<u16>(segments, "uint16 (16-bit float bits)")?;
                if dtype == "float16" {
                    let views = arrays.iter().map(|a| reinterpret_u16::<f16>(a.as_array())).collect::<PyResult<Vec<_>>>()?;
                    self.run_step(py, &views, idx, segments, background)
                } else {
                    let views = arrays.iter().map(|a| reinterpret_u16::<bf16>(a.as_array())).collect::<PyResult<Vec<_>>>()?;
                    self.run_step(py, &views, idx, segments, background)
                }
            }
            other => Err(UnsupportedInputError::new_err(format!(
                "gradient dtype {other} is not supported; expected float32, float64, float16 or bfloat16"
            ))),
        }
    }

    /// One step now, or (`background`) lent to a worker with `keep`, the arrays behind `views`.
    fn run_step<G: GradElem>(
        &mut self,
        py: Python<'_>,
        views: &[ArrayView2<'_, G>],
        indices: &[u32],
        keep: &[Bound<'_, PyAny>],
        background: bool,
    ) -> PyResult<()> {
        if !background {
            return step_any(py, self.sampler(py)?, views, indices);
        }
        self.sampler(py)?;
        let raw = RawBatch::of(views).map_err(to_py)?;
        let indices = indices.to_vec();
        self.lend_step(keep, move |s| {
            // SAFETY: the arrays are kept alive by `Lent::keep` until this result is received
            // (`NativeSampler::sampler`; `Drop` waits for it too), and the caller does not write to them
            // until then.
            let views = unsafe { raw.views() };
            let batch = Batch::from_views(&views)?;
            with_sampler!(s, s => s.step(&batch, &indices))
        })
    }

    /// Hand the sampler to a worker running `work`, keeping `keep` (the arrays it reads) alive meanwhile.
    fn lend_step(
        &mut self,
        keep: &[Bound<'_, PyAny>],
        work: impl FnOnce(&mut AnySampler) -> Result<(), GrabError> + Send + 'static,
    ) -> PyResult<()> {
        let sampler = match std::mem::replace(&mut self.slot, Slot::Gone) {
            Slot::Here(s) => s,
            other => {
                self.slot = other;
                return Err(lost());
            }
        };
        let done = Mutex::new(lend(sampler, work));
        let keep = keep.iter().map(|a| a.clone().unbind()).collect();
        self.slot = Slot::Lent(Lent { done, keep });
        Ok(())
    }
}

impl Drop for NativeSampler {
    fn drop(&mut self) {
        // A worker may still be reading the arrays `keep` holds: wait for it before they are released.
        if let Slot::Lent(lent) = std::mem::replace(&mut self.slot, Slot::Gone) {
            let done = lent.done.into_inner().unwrap_or_else(|e| e.into_inner());
            let _ = done.recv();
        }
    }
}

fn lost() -> PyErr {
    StateDictError::new_err(
        "internal error: this sampler's state did not come back from its background step; load a checkpoint",
    )
}

fn projection_spec(p: Option<(String, usize)>) -> Result<Option<ProjectionSpec>, GrabError> {
    p.map(|(kind, k)| {
        Ok(ProjectionSpec {
            kind: SketchKind::parse(&kind)?,
            k,
        })
    })
    .transpose()
}

fn state_bytes<S: StateElem>(s: &Sampler<S>) -> usize {
    let n = s.config().n;
    let orders = s.current().len() * 4 + s.config().fixed_order.as_ref().map_or(0, |o| o.len() * 4);
    let assembly = if s.config().kind.balances() && s.epochs_begun() > 0 {
        n * 4 + n.div_ceil(64) * 8
    } else {
        0
    };
    let sums = match s.balance() {
        Some(Balance::Mean(b)) => 3 * b.s.len() * std::mem::size_of::<S>(),
        Some(Balance::Pair(b)) => b.s.len() * std::mem::size_of::<S>() + b.pending_grad.len() * 8,
        Some(Balance::Recursive(b)) => {
            (b.sums.len() + 2 * b.m.len()) * std::mem::size_of::<S>() + b.codes.capacity() * 4
        }
        Some(Balance::RecursivePair(b)) => {
            b.sums.len() * std::mem::size_of::<S>()
                + b.pending_vecs.len() * 8
                + b.pending_units
                    .iter()
                    .map(|u| u.capacity() * 4)
                    .sum::<usize>()
        }
        Some(Balance::Stored(b)) => b.rows.len() * std::mem::size_of::<S>(),
        None => 0,
    };
    orders + assembly + sums + s.sketch_bytes()
}

fn get<'py, T>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<T>
where
    T: for<'a> FromPyObject<'a, 'py>,
{
    let item = d
        .get_item(key)?
        .ok_or_else(|| StateDictError::new_err(format!("the state dict has no entry {key:?}")))?;
    item.extract::<T>().map_err(|_| {
        StateDictError::new_err(format!("the state dict entry {key:?} has the wrong type"))
    })
}

/// An optional entry: `default` when the key is absent (older state dicts).
fn get_or<'py, T>(d: &Bound<'py, PyDict>, key: &str, default: T) -> PyResult<T>
where
    T: for<'a> FromPyObject<'a, 'py>,
{
    match d.get_item(key)? {
        None => Ok(default),
        Some(_) => get(d, key),
    }
}

fn get_vec<'py, T: Element + Copy>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Vec<T>> {
    let item = d
        .get_item(key)?
        .ok_or_else(|| StateDictError::new_err(format!("the state dict has no entry {key:?}")))?;
    let arr = item.extract::<PyReadonlyArray1<'py, T>>().map_err(|_| {
        StateDictError::new_err(format!(
            "the state dict entry {key:?} must be a 1-D array of {}",
            std::any::type_name::<T>()
        ))
    })?;
    Ok(arr.as_array().to_vec())
}

fn get_dict<'py>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
    match d.get_item(key)? {
        None => Err(StateDictError::new_err(format!(
            "the state dict has no entry {key:?}"
        ))),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => Ok(Some(v.cast_into::<PyDict>().map_err(|_| {
            StateDictError::new_err(format!(
                "the state dict entry {key:?} must be a dict or None"
            ))
        })?)),
    }
}

/// 2: the next order under construction is stored as its placed blocks ("next", "next_back") without
/// the bitmap (it is the set of placed units). Version 1 dicts (whole buffer + bitmap) still load.
const STATE_VERSION: u64 = 2;

/// The O(n) arrays of the last export, kept while they cannot change, so that a checkpoint per batch
/// costs O(d + B), not O(n): the running epoch's order (fixed for the epoch, exported once) and
/// per-epoch mirrors of the append-only buffers (the next order's front and back blocks, the
/// recursive leaf codes), topped up with what was placed since the last export. A state dict holds
/// views of the filled parts; later steps write only outside them, and a new epoch gets new
/// mirrors, so a dict handed out earlier never changes.
#[derive(Default)]
struct ExportCache {
    /// The epoch (`epochs_begun`) the arrays below belong to.
    epochs_begun: u64,
    current: Option<Py<PyArray1<u32>>>,
    /// n entries; [..front] and [n - back..] are copies of the sampler's assembly buffer.
    next: Option<Py<PyArray1<u32>>>,
    front: usize,
    back: usize,
    /// [..codes_len] are copies of the recursive balance's leaf codes.
    codes: Option<Py<PyArray1<u32>>>,
    codes_len: usize,
}

/// Copy `src[from..to]` into the mirror `dst` (same positions).
fn top_up(dst: &Bound<'_, PyArray1<u32>>, src: &[u32], from: usize, to: usize) -> PyResult<()> {
    if from < to {
        let mut rw = dst.try_readwrite().map_err(|e| {
            StateDictError::new_err(format!("the state export buffer is not writable: {e}"))
        })?;
        let m = rw.as_slice_mut().map_err(|e| {
            StateDictError::new_err(format!("the state export buffer is not contiguous: {e}"))
        })?;
        m[from..to].copy_from_slice(&src[from..to]);
    }
    Ok(())
}

fn view<'py>(
    arr: &Bound<'py, PyArray1<u32>>,
    start: usize,
    stop: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let py = arr.py();
    arr.as_any()
        .get_item(PySlice::new(py, start as isize, stop as isize, 1))
}

impl ExportCache {
    /// Bring the mirrors up to date with `p`, starting afresh for a new epoch (or if anything shrank,
    /// which a running epoch never does).
    fn sync<S>(&mut self, py: Python<'_>, p: &StateParts<'_, S>) -> PyResult<()> {
        let codes: &[u32] = match p.balance {
            Some(Balance::Recursive(b)) => &b.codes,
            _ => &[],
        };
        let parts = p.assembly.map(FrontBack::parts);
        let shrank = parts.is_some_and(|(_, f, b, _)| f < self.front || b < self.back)
            || codes.len() < self.codes_len;
        if self.current.is_none() || self.epochs_begun != p.epochs_begun || shrank {
            *self = ExportCache {
                epochs_begun: p.epochs_begun,
                current: Some(PyArray1::from_slice(py, p.current).unbind()),
                ..ExportCache::default()
            };
        }
        if let Some((buf, f, b, _)) = parts {
            let n = buf.len();
            let next = self
                .next
                .get_or_insert_with(|| PyArray1::<u32>::zeros(py, n, false).unbind())
                .bind(py);
            top_up(next, buf, self.front, f)?;
            top_up(next, buf, n - b, n - self.back)?;
            self.front = f;
            self.back = b;
        }
        if !codes.is_empty() {
            let n = p.config.n;
            let mirror = self
                .codes
                .get_or_insert_with(|| {
                    PyArray1::<u32>::zeros(py, n.max(codes.len()), false).unbind()
                })
                .bind(py);
            top_up(mirror, codes, self.codes_len, codes.len())?;
            self.codes_len = codes.len();
        }
        Ok(())
    }
}

fn export<'py, S: StateElem + Element>(
    py: Python<'py>,
    st: StateParts<'_, S>,
    cache: &mut ExportCache,
    dtype: &str,
) -> PyResult<Bound<'py, PyDict>> {
    cache.sync(py, &st)?;
    let d = PyDict::new(py);
    let c = st.config;
    d.set_item("version", STATE_VERSION)?;
    d.set_item("ordering", c.kind.name())?;
    d.set_item("n", c.n)?;
    d.set_item("seed", c.seed)?;
    d.set_item("first_epoch_random", c.first_epoch_random)?;
    d.set_item("random_signs", c.random_signs)?;
    d.set_item("delta", c.delta)?;
    d.set_item("state_dtype", dtype)?;
    match &c.fixed_order {
        Some(o) => d.set_item("fixed_order", PyArray1::from_slice(py, o))?,
        None => d.set_item("fixed_order", py.None())?,
    }
    d.set_item("depth", c.depth)?;
    d.set_item("rounds", c.rounds)?;
    d.set_item("projection", c.projection.map(|p| (p.kind.name(), p.k)))?;
    d.set_item("max_memory", c.max_memory)?;
    d.set_item("input_dim", st.input_dim)?;
    d.set_item("epochs_begun", st.epochs_begun)?;
    d.set_item("epoch", st.epoch)?;
    d.set_item("current", cache.current.as_ref().map(|a| a.bind(py)))?;
    match (st.assembly, cache.next.as_ref()) {
        (Some(asm), Some(next)) => {
            let (buf, front, back, _) = asm.parts();
            let next = next.bind(py);
            let a = PyDict::new(py);
            a.set_item("next", view(next, 0, front)?)?;
            a.set_item("next_back", view(next, buf.len() - back, buf.len())?)?;
            a.set_item("front", front)?;
            a.set_item("back", back)?;
            d.set_item("assembly", a)?;
        }
        _ => d.set_item("assembly", py.None())?,
    }
    match st.balance {
        Some(Balance::Mean(b)) => {
            let a = PyDict::new(py);
            a.set_item("kind", "mean")?;
            a.set_item("s", PyArray1::from_slice(py, &b.s))?;
            a.set_item("m", PyArray1::from_slice(py, &b.m))?;
            a.set_item("m_next", PyArray1::from_slice(py, &b.m_next))?;
            a.set_item("seen", b.seen)?;
            d.set_item("balance", a)?;
        }
        Some(Balance::Pair(b)) => {
            let a = PyDict::new(py);
            a.set_item("kind", "pair")?;
            a.set_item("s", PyArray1::from_slice(py, &b.s))?;
            a.set_item("pending", b.pending.map(|p| p as i64).unwrap_or(-1))?;
            a.set_item("pending_grad", PyArray1::from_slice(py, &b.pending_grad))?;
            d.set_item("balance", a)?;
        }
        Some(Balance::Recursive(b)) => {
            let a = PyDict::new(py);
            a.set_item("kind", "recursive")?;
            a.set_item("depth", b.depth)?;
            a.set_item("sums", PyArray1::from_slice(py, &b.sums))?;
            a.set_item("m", PyArray1::from_slice(py, &b.m))?;
            a.set_item("m_next", PyArray1::from_slice(py, &b.m_next))?;
            a.set_item("seen", b.seen)?;
            match cache.codes.as_ref() {
                Some(codes) => a.set_item("codes", view(codes.bind(py), 0, cache.codes_len)?)?,
                None => a.set_item("codes", PyArray1::<u32>::zeros(py, 0, false))?,
            }
            d.set_item("balance", a)?;
        }
        Some(Balance::RecursivePair(b)) => {
            let a = PyDict::new(py);
            a.set_item("kind", "recursive-pair")?;
            a.set_item("depth", b.depth)?;
            a.set_item("sums", PyArray1::from_slice(py, &b.sums))?;
            let lens: Vec<u32> = b.pending_units.iter().map(|u| u.len() as u32).collect();
            let units: Vec<u32> = b.pending_units.iter().flatten().copied().collect();
            a.set_item("pending_lens", lens.into_pyarray(py))?;
            a.set_item("pending_units", units.into_pyarray(py))?;
            a.set_item("pending_vecs", PyArray1::from_slice(py, &b.pending_vecs))?;
            d.set_item("balance", a)?;
        }
        Some(Balance::Stored(b)) => {
            // O(n d): the offline orderings' state is every unit's gradient.
            let a = PyDict::new(py);
            a.set_item("kind", "stored")?;
            a.set_item("d", b.d)?;
            a.set_item("rows", PyArray1::from_slice(py, &b.rows))?;
            d.set_item("balance", a)?;
        }
        None => d.set_item("balance", py.None())?,
    }
    match st.sign_rng {
        Some(words) => d.set_item("sign_rng", PyList::new(py, words)?)?,
        None => d.set_item("sign_rng", py.None())?,
    }
    Ok(d)
}

fn import<S: StateElem + Element>(d: &Bound<'_, PyDict>) -> PyResult<SamplerState<S>> {
    let version: u64 = get(d, "version")?;
    if version != STATE_VERSION && version != 1 {
        return Err(StateDictError::new_err(format!(
            "state dict version {version} is not supported (expected {STATE_VERSION})"
        )));
    }
    let name: String = get(d, "ordering")?;
    let kind = OrderingKind::parse(&name).map_err(to_py)?;
    let mut config = Config::new(kind, get(d, "n")?, get(d, "seed")?);
    config.first_epoch_random = get(d, "first_epoch_random")?;
    config.random_signs = get(d, "random_signs")?;
    config.delta = get(d, "delta")?;
    config.fixed_order = match d.get_item("fixed_order")? {
        Some(v) if !v.is_none() => Some(get_vec::<u32>(d, "fixed_order")?),
        _ => None,
    };
    // Entries added with the ordering family; a state dict from before them takes the defaults.
    config.depth = get_or(d, "depth", config.depth)?;
    config.rounds = get_or(d, "rounds", config.rounds)?;
    config.projection = projection_spec(get_or::<Option<(String, usize)>>(d, "projection", None)?)
        .map_err(to_py)?;
    config.max_memory = get_or(d, "max_memory", None)?;
    let input_dim: Option<u64> = get_or(d, "input_dim", None)?;
    let current: Vec<u32> = get_vec(d, "current")?;
    let assembly = match get_dict(d, "assembly")? {
        Some(a) if version == 1 => Some((
            get_vec::<u32>(&a, "next")?,
            get(&a, "front")?,
            get(&a, "back")?,
            get_vec::<u64>(&a, "taken")?,
        )),
        Some(a) => {
            let (front_block, back_block) =
                (get_vec::<u32>(&a, "next")?, get_vec(&a, "next_back")?);
            let (front, back): (u64, u64) = (get(&a, "front")?, get(&a, "back")?);
            if front != front_block.len() as u64 || back != back_block.len() as u64 {
                return Err(StateDictError::new_err(format!(
                    "corrupted assembly state: pointers (front {front}, back {back}) do not fit the \
                     placed blocks ({} and {} units)",
                    front_block.len(),
                    back_block.len()
                )));
            }
            // The buffer is as long as the running order (n is checked against it afterwards).
            let (next, taken) =
                FrontBack::buffer_from_blocks(current.len(), &front_block, &back_block)
                    .map_err(to_py)?;
            Some((next, front, back, taken))
        }
        None => None,
    };
    let balance = match get_dict(d, "balance")? {
        Some(b) => {
            let kind: String = get(&b, "kind")?;
            Some(match kind.as_str() {
                "mean" => Balance::Mean(MeanBalance::from_parts(
                    get_vec(&b, "s")?,
                    get_vec(&b, "m")?,
                    get_vec(&b, "m_next")?,
                    get(&b, "seen")?,
                )),
                "pair" => {
                    let p: i64 = get(&b, "pending")?;
                    let pending =
                        if p < 0 {
                            None
                        } else {
                            Some(u32::try_from(p).map_err(|_| {
                                StateDictError::new_err("pending unit out of range")
                            })?)
                        };
                    Balance::Pair(PairBalance::from_parts(
                        get_vec(&b, "s")?,
                        pending,
                        get_vec(&b, "pending_grad")?,
                    ))
                }
                "recursive" => Balance::Recursive(RecursiveBalance {
                    depth: get(&b, "depth")?,
                    sums: get_vec(&b, "sums")?,
                    m: get_vec(&b, "m")?,
                    m_next: get_vec(&b, "m_next")?,
                    seen: get(&b, "seen")?,
                    codes: get_vec(&b, "codes")?,
                }),
                "recursive-pair" => {
                    let lens: Vec<u32> = get_vec(&b, "pending_lens")?;
                    let units: Vec<u32> = get_vec(&b, "pending_units")?;
                    if lens.iter().map(|&l| l as usize).sum::<usize>() != units.len() {
                        return Err(StateDictError::new_err(
                            "corrupted state: pending_lens does not add up to pending_units",
                        ));
                    }
                    let mut rest = &units[..];
                    let pending_units = lens
                        .iter()
                        .map(|&l| {
                            let (head, tail) = rest.split_at(l as usize);
                            rest = tail;
                            head.to_vec()
                        })
                        .collect();
                    Balance::RecursivePair(RecursivePairBalance {
                        depth: get(&b, "depth")?,
                        sums: get_vec(&b, "sums")?,
                        pending_units,
                        pending_vecs: get_vec(&b, "pending_vecs")?,
                    })
                }
                "stored" => Balance::Stored(StoredGradients {
                    d: get(&b, "d")?,
                    rows: get_vec(&b, "rows")?,
                }),
                other => {
                    return Err(StateDictError::new_err(format!(
                        "unknown balance kind {other:?}"
                    )))
                }
            })
        }
        None => None,
    };
    let sign_rng = match d.get_item("sign_rng")? {
        Some(v) if !v.is_none() => Some(get::<[u64; 4]>(d, "sign_rng")?),
        _ => None,
    };
    Ok(SamplerState {
        config,
        epochs_begun: get(d, "epochs_begun")?,
        epoch: get(d, "epoch")?,
        current,
        assembly,
        balance,
        sign_rng,
        input_dim,
    })
}

/// Deterministic signs (+1/-1, float64) of B rows from u = Z s0 and the B x B Gram matrix Z Z^T:
/// the Gram formulation of GraB's sequential sign rule.
#[pyfunction]
fn sign_scan<'py>(
    py: Python<'py>,
    u: PyReadonlyArray1<'py, f64>,
    gram: PyReadonlyArray2<'py, f64>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let u = u
        .as_slice()
        .map_err(|_| UnsupportedInputError::new_err("u must be contiguous"))?;
    let g = gram
        .as_slice()
        .map_err(|_| UnsupportedInputError::new_err("gram must be C-contiguous"))?;
    let signs = py
        .detach(|| {
            crate::sign_scan::sign_scan(u, g, &mut crate::sign::SignRule::deterministic(), 1, 1)
        })
        .map_err(to_py)?;
    Ok(signs
        .into_iter()
        .map(|(eps, _)| eps)
        .collect::<Vec<f64>>()
        .into_pyarray(py))
}

/// A count sketch's bucket-grouped tables, as the kernels of `sketch_rows` read them.
fn buckets<'a>(
    order: &'a PyReadonlyArray1<'_, u32>,
    starts: &'a PyReadonlyArray1<'_, u32>,
    signs: &'a PyReadonlyArray1<'_, f32>,
) -> PyResult<crate::sketch_rows::Buckets<'a>> {
    let contiguous =
        |what: &str| UnsupportedInputError::new_err(format!("{what} must be contiguous"));
    Ok(crate::sketch_rows::Buckets {
        order: order.as_slice().map_err(|_| contiguous("order"))?,
        starts: starts.as_slice().map_err(|_| contiguous("starts"))?,
        signs: signs.as_slice().map_err(|_| contiguous("signs"))?,
    })
}

/// The caller's row slot, borrowed for writing (refused, with nothing written, when NumPy says no).
fn writable<'py>(out: &Bound<'py, PyArray2<f32>>) -> PyResult<PyReadwriteArray2<'py, f32>> {
    out.try_readwrite()
        .map_err(|e| UnsupportedInputError::new_err(format!("out is not writable: {e}")))
}

/// Count sketch of the rows of `x` (float32, rows x n): a new rows x k array, k = len(starts) - 1, from
/// the bucket-grouped tables (`sketch_rows::count_sketch`; watch()'s wide Linear inputs on the CPU).
#[pyfunction]
fn count_sketch<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    order: PyReadonlyArray1<'py, u32>,
    starts: PyReadonlyArray1<'py, u32>,
    signs: PyReadonlyArray1<'py, f32>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let xv = x.as_array();
    let tables = buckets(&order, &starts, &signs)?;
    let out = py
        .detach(|| crate::sketch_rows::count_sketch(xv, &tables))
        .map_err(to_py)?;
    Ok(out.into_pyarray(py))
}

/// Write (or, with `accumulate`, add) `scale` times a Linear layer's weight and bias row blocks,
/// vec(g_r a_r^T) then g_r, into `out` (float32, any strides; `sketch_rows::outer_rows`). Returns
/// whether every value written is finite.
#[pyfunction]
#[pyo3(signature = (g, a, scale, bias, accumulate, out))]
fn outer_rows<'py>(
    py: Python<'py>,
    g: PyReadonlyArray2<'py, f32>,
    a: PyReadonlyArray2<'py, f32>,
    scale: f32,
    bias: bool,
    accumulate: bool,
    out: &Bound<'py, PyArray2<f32>>,
) -> PyResult<bool> {
    let mut rw = writable(out)?;
    let (gv, av, ov) = (g.as_array(), a.as_array(), rw.as_array_mut());
    py.detach(|| crate::sketch_rows::outer_rows(gv, av, scale, bias, accumulate, ov))
        .map_err(to_py)
}

/// `outer_rows` with `a` the count sketch of `x` (float32, rows x n) by the bucket-grouped tables of
/// `count_sketch`, in one call (`sketch_rows::count_outer_rows`): a lone Linear layer's wide input,
/// sketched in its backward. Returns whether every value written is finite.
#[pyfunction]
#[pyo3(signature = (g, x, order, starts, signs, scale, bias, accumulate, out))]
#[allow(clippy::too_many_arguments)]
fn count_outer_rows<'py>(
    py: Python<'py>,
    g: PyReadonlyArray2<'py, f32>,
    x: PyReadonlyArray2<'py, f32>,
    order: PyReadonlyArray1<'py, u32>,
    starts: PyReadonlyArray1<'py, u32>,
    signs: PyReadonlyArray1<'py, f32>,
    scale: f32,
    bias: bool,
    accumulate: bool,
    out: &Bound<'py, PyArray2<f32>>,
) -> PyResult<bool> {
    let tables = buckets(&order, &starts, &signs)?;
    let mut rw = writable(out)?;
    let (gv, xv, ov) = (g.as_array(), x.as_array(), rw.as_array_mut());
    py.detach(|| crate::sketch_rows::count_outer_rows(gv, xv, &tables, scale, bias, accumulate, ov))
        .map_err(to_py)
}

/// The factors of `outer_rows`'s rows, written into `out` (float32, rows x (p + q), any strides):
/// `scale * g[r]` then `a[r]` (`sketch_rows::outer_factors`; `NativeSampler.step_outer` balances the rows
/// they stand for). Returns whether every value of those rows is finite.
#[pyfunction]
#[pyo3(signature = (g, a, scale, out))]
fn outer_factors<'py>(
    py: Python<'py>,
    g: PyReadonlyArray2<'py, f32>,
    a: PyReadonlyArray2<'py, f32>,
    scale: f32,
    out: &Bound<'py, PyArray2<f32>>,
) -> PyResult<bool> {
    let mut rw = writable(out)?;
    let (gv, av, ov) = (g.as_array(), a.as_array(), rw.as_array_mut());
    py.detach(|| crate::sketch_rows::outer_factors(gv, av, scale, ov))
        .map_err(to_py)
}

/// The factors of `count_outer_rows`'s rows, written into `out` (float32, rows x (p + k), any strides):
/// `scale * g[r]` then the count sketch of `x[r]` (`sketch_rows::count_factors`; `NativeSampler.step_outer`
/// balances the rows they stand for). Returns whether every value of those rows is finite.
#[pyfunction]
#[pyo3(signature = (g, x, order, starts, signs, scale, out))]
#[allow(clippy::too_many_arguments)]
fn count_factors<'py>(
    py: Python<'py>,
    g: PyReadonlyArray2<'py, f32>,
    x: PyReadonlyArray2<'py, f32>,
    order: PyReadonlyArray1<'py, u32>,
    starts: PyReadonlyArray1<'py, u32>,
    signs: PyReadonlyArray1<'py, f32>,
    scale: f32,
    out: &Bound<'py, PyArray2<f32>>,
) -> PyResult<bool> {
    let tables = buckets(&order, &starts, &signs)?;
    let mut rw = writable(out)?;
    let (gv, xv, ov) = (g.as_array(), x.as_array(), rw.as_array_mut());
    py.detach(|| crate::sketch_rows::count_factors(gv, xv, &tables, scale, ov))
        .map_err(to_py)
}

/// The rows that factors (float32, C-contiguous, rows x (p + q)) stand for, as a new array: row r is
/// vec(f[r, :p] f[r, p:]^T), then f[r, :p] with `bias` (`sketch_rows::expand_outer`): for the paths
/// that take rows, not factors (a scan for non-finite values, rows sent to other ranks).
#[pyfunction]
fn expand_outer<'py>(
    py: Python<'py>,
    factors: PyReadonlyArray2<'py, f32>,
    p: usize,
    bias: bool,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let fv = factors.as_array();
    let (rows, cols) = fv.dim();
    let flat = fv
        .to_slice()
        .ok_or_else(|| UnsupportedInputError::new_err("factors must be C-contiguous"))?;
    if p == 0 || p > cols {
        return Err(ShapeError::new_err(format!(
            "expand_outer: factors {cols} wide split after column {p} (need 1 <= p <= {cols})"
        )));
    }
    let width = crate::sketch_rows::outer_width(p, cols - p, bias);
    let mut buf = crate::sampler::zeros(rows, width).map_err(to_py)?;
    py.detach(|| crate::sketch_rows::expand_outer(flat, cols, p, bias, &mut buf))
        .map_err(to_py)?;
    let out = ndarray::Array2::from_shape_vec((rows, width), buf)
        .map_err(|e| ShapeError::new_err(e.to_string()))?;
    Ok(out.into_pyarray(py))
}

/// Write (or, with `accumulate`, add) `scale` times each example's channel sums of `g` (float32, C-contiguous,
/// [rows, channels, ...]: a convolution's output gradient) into `out` ([rows, channels], any strides): a
/// convolution's exact bias rows (`sketch_rows::channel_sums`). Returns whether every value the rows hold
/// afterwards is finite.
#[pyfunction]
#[pyo3(signature = (g, scale, accumulate, out))]
fn channel_sums<'py>(
    py: Python<'py>,
    g: PyReadonlyArrayDyn<'py, f32>,
    scale: f32,
    accumulate: bool,
    out: &Bound<'py, PyArray2<f32>>,
) -> PyResult<bool> {
    let shape = g.shape();
    if shape.len() < 2 {
        return Err(ShapeError::new_err(format!(
            "channel sums: g must be [rows, channels, ...], got {} dimension(s)",
            shape.len()
        )));
    }
    let (rows, c) = (shape[0], shape[1]);
    let values = g
        .as_slice()
        .map_err(|_| UnsupportedInputError::new_err("g must be C-contiguous"))?;
    let mut rw = writable(out)?;
    let ov = rw.as_array_mut();
    py.detach(|| crate::sketch_rows::channel_sums(values, rows, c, scale, accumulate, ov))
        .map_err(to_py)
}

/// Write (or, with `accumulate`, add) `scale` times a BatchNorm's, GroupNorm's or InstanceNorm's exact
/// per-example contributions into `out` ([rows, width], any strides): per channel the sum of `g * x_hat` (with
/// `weight`) then the sum of `g` (with `bias`), from its input `x` and output gradient `g` (float32,
/// C-contiguous, the same [rows, channels, ...] shape), normalized by the batch's statistics, by
/// `running_mean` and `running_var` when given, or with `groups` > 0 by each example's own statistics
/// over that many groups of channels (`sketch_rows::norm_sums`). Returns whether every value the rows
/// hold afterwards is finite.
#[pyfunction]
#[pyo3(signature = (x, g, eps, running_mean, running_var, weight, bias, scale, accumulate, out, groups=0))]
#[allow(clippy::too_many_arguments)]
fn norm_sums<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    g: PyReadonlyArrayDyn<'py, f32>,
    eps: f64,
    running_mean: Option<PyReadonlyArray1<'py, f32>>,
    running_var: Option<PyReadonlyArray1<'py, f32>>,
    weight: bool,
    bias: bool,
    scale: f32,
    accumulate: bool,
    out: &Bound<'py, PyArray2<f32>>,
    groups: usize,
) -> PyResult<bool> {
    let shape = g.shape();
    if shape.len() < 2 || x.shape() != shape {
        return Err(ShapeError::new_err(format!(
            "norm sums: x and g must be [rows, channels, ...] of one shape, got {:?} and {:?}",
            x.shape(),
            shape
        )));
    }
    let (rows, c) = (shape[0], shape[1]);
    let contiguous =
        |name: &str| UnsupportedInputError::new_err(format!("{name} must be C-contiguous"));
    let xs = x.as_slice().map_err(|_| contiguous("x"))?;
    let gs = g.as_slice().map_err(|_| contiguous("g"))?;
    let stats = match (&running_mean, &running_var, groups) {
        (Some(m), Some(v), 0) => NormStats::Running(
            m.as_slice().map_err(|_| contiguous("running_mean"))?,
            v.as_slice().map_err(|_| contiguous("running_var"))?,
        ),
        (None, None, 0) => NormStats::Batch,
        (None, None, groups) => NormStats::Groups(groups),
        (Some(_), Some(_), _) => {
            return Err(ShapeError::new_err(
                "norm sums: running statistics or groups, not both",
            ))
        }
        _ => {
            return Err(ShapeError::new_err(
                "norm sums: running_mean and running_var go together (both or neither)",
            ))
        }
    };
    let mut rw = writable(out)?;
    let ov = rw.as_array_mut();
    py.detach(|| {
        crate::sketch_rows::norm_sums(
            xs, gs, rows, c, eps, stats, weight, bias, scale, accumulate, ov,
        )
    })
    .map_err(to_py)
}

/// The names of the available orderings.
#[pyfunction]
fn orderings() -> Vec<&'static str> {
    ORDERING_NAMES.to_vec()
}

/// Herding discrepancy of `order` on the rows of `vectors` (n x d float64): (l_inf, l2) of the
/// largest prefix sum of mean-centered rows.
#[pyfunction]
fn herding_discrepancy(
    py: Python<'_>,
    vectors: PyReadonlyArray2<'_, f64>,
    order: PyReadonlyArray1<'_, u32>,
) -> PyResult<(f64, f64)> {
    let (n, d) = (vectors.shape()[0], vectors.shape()[1]);
    let v = vectors
        .as_slice()
        .map_err(|_| UnsupportedInputError::new_err("vectors must be C-contiguous"))?;
    let o = order
        .as_slice()
        .map_err(|_| UnsupportedInputError::new_err("order must be contiguous"))?;
    py.detach(|| crate::discrepancy::herding_discrepancy(v, n, d, o))
        .map_err(to_py)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<NativeSampler>()?;
    register_coordinated(m)?;
    m.add_function(wrap_pyfunction!(orderings, m)?)?;
    m.add_function(wrap_pyfunction!(herding_discrepancy, m)?)?;
    m.add_function(wrap_pyfunction!(sign_scan, m)?)?;
    m.add_function(wrap_pyfunction!(count_sketch, m)?)?;
    m.add_function(wrap_pyfunction!(count_outer_rows, m)?)?;
    m.add_function(wrap_pyfunction!(count_factors, m)?)?;
    m.add_function(wrap_pyfunction!(outer_factors, m)?)?;
    m.add_function(wrap_pyfunction!(expand_outer, m)?)?;
    m.add_function(wrap_pyfunction!(outer_rows, m)?)?;
    m.add_function(wrap_pyfunction!(channel_sums, m)?)?;
    m.add_function(wrap_pyfunction!(norm_sums, m)?)?;
    m.add("GraBError", py.get_type::<GraBError>())?;
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add(
        "NonFiniteGradientError",
        py.get_type::<NonFiniteGradientError>(),
    )?;
    m.add("UnitIndexError", py.get_type::<UnitIndexError>())?;
    m.add("CallOrderError", py.get_type::<CallOrderError>())?;
    m.add("StateDictError", py.get_type::<StateDictError>())?;
    m.add("MemoryLimitError", py.get_type::<MemoryLimitError>())?;
    m.add(
        "UnsupportedInputError",
        py.get_type::<UnsupportedInputError>(),
    )?;
    Ok(())
}

// ---------------------------------------------------------------- CD-GraB (issue 7)

/// Run `$body` with `$views` bound to the segments as typed views, dispatching on the dtype name.
macro_rules! with_views {
    ($segments:expr, $dtype:expr, $views:ident => $body:expr) => {{
        match $dtype {
            "float32" => {
                let arrays = extract_segments::<f32>(&$segments, $dtype)?;
                let $views = array_views(&arrays);
                $body
            }
            "float64" => {
                let arrays = extract_segments::<f64>(&$segments, $dtype)?;
                let $views = array_views(&arrays);
                $body
            }
            "float16" => {
                let arrays = extract_segments::<u16>(&$segments, "uint16 (16-bit float bits)")?;
                let $views = arrays.iter().map(|a| reinterpret_u16::<f16>(a.as_array())).collect::<PyResult<Vec<_>>>()?;
                $body
            }
            "bfloat16" => {
                let arrays = extract_segments::<u16>(&$segments, "uint16 (16-bit float bits)")?;
                let $views = arrays.iter().map(|a| reinterpret_u16::<bf16>(a.as_array())).collect::<PyResult<Vec<_>>>()?;
                $body
            }
            other => Err(UnsupportedInputError::new_err(format!(
                "gradient dtype {other} is not supported; expected float32, float64, float16 or bfloat16"
            ))),
        }
    }};
}

fn flat_f64<'a>(a: &'a PyReadonlyArray1<'_, f64>, what: &str) -> PyResult<&'a [f64]> {
    a.as_slice().map_err(|_| {
        UnsupportedInputError::new_err(format!("{what} must be a contiguous float64 array"))
    })
}

/// The replicated CD-GraB order server of one rank. Use `torchgrab.DistributedGraBSampler`.
#[pyclass(name = "NativeCoordinated", module = "torchgrab._native")]
struct NativeCoordinated {
    inner: crate::coordinated::Coordinated,
}

#[pymethods]
impl NativeCoordinated {
    #[new]
    fn new(world: usize, rank: usize, shard_len: usize) -> PyResult<Self> {
        Ok(NativeCoordinated {
            inner: crate::coordinated::Coordinated::new(world, rank, shard_len).map_err(to_py)?,
        })
    }

    /// Close the running epoch and start the next; returns this rank's order of local unit ids.
    fn begin_epoch<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        let inner = &mut self.inner;
        py.detach(|| inner.begin_epoch().to_vec()).into_pyarray(py)
    }

    /// Shard `w`'s current order of local unit ids.
    fn shard_order<'py>(&self, py: Python<'py>, w: usize) -> PyResult<Bound<'py, PyArray1<u32>>> {
        if w >= self.inner.world() {
            return Err(UnitIndexError::new_err(format!(
                "shard {w} does not exist; there are {}",
                self.inner.world()
            )));
        }
        Ok(PyArray1::from_slice(py, self.inner.shard_order(w)))
    }

    /// Pairs a step of `rows` rows closes on every shard.
    fn pair_count(&self, rows: usize) -> usize {
        self.inner.pair_count(rows)
    }

    /// Exact mode, local: this rank's pair differences, P x d float64 (flat).
    fn local_diffs<'py>(
        &self,
        py: Python<'py>,
        segments: Vec<Bound<'py, PyAny>>,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let inner = &self.inner;
        let out = with_views!(segments, dtype, views => {
            let batch = Batch::from_views(&views).map_err(to_py)?;
            py.detach(|| inner.local_diffs(&batch)).map_err(to_py)
        })?;
        Ok(out.into_pyarray(py))
    }

    /// Exact mode, replicated: sign all gathered differences (W x P x d float64, flat) in rank order.
    fn step_exact<'py>(
        &mut self,
        py: Python<'py>,
        segments: Vec<Bound<'py, PyAny>>,
        dtype: &str,
        gathered: PyReadonlyArray1<'py, f64>,
    ) -> PyResult<()> {
        let g = flat_f64(&gathered, "the gathered differences")?;
        let inner = &mut self.inner;
        with_views!(segments, dtype, views => {
            let batch = Batch::from_views(&views).map_err(to_py)?;
            py.detach(|| inner.step_exact(&batch, g)).map_err(to_py)
        })
    }

    /// Efficient mode, local: [u (P) | Gram (P x P)] float64.
    fn local_stats<'py>(
        &self,
        py: Python<'py>,
        segments: Vec<Bound<'py, PyAny>>,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let inner = &self.inner;
        let out = with_views!(segments, dtype, views => {
            let batch = Batch::from_views(&views).map_err(to_py)?;
            py.detach(|| inner.local_stats(&batch)).map_err(to_py)
        })?;
        Ok(out.into_pyarray(py))
    }

    /// Efficient mode, replicated: signs from the gathered (u, Gram) blocks; returns this rank's signed sum (d).
    fn decide<'py>(
        &mut self,
        py: Python<'py>,
        segments: Vec<Bound<'py, PyAny>>,
        dtype: &str,
        gathered: PyReadonlyArray1<'py, f64>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let g = flat_f64(&gathered, "the gathered inner products")?;
        let inner = &mut self.inner;
        let out = with_views!(segments, dtype, views => {
            let batch = Batch::from_views(&views).map_err(to_py)?;
            py.detach(|| inner.decide(&batch, g)).map_err(to_py)
        })?;
        Ok(out.into_pyarray(py))
    }

    /// Refuse (raise) a step this rank could not take; changes nothing.
    fn validate<'py>(
        &self,
        py: Python<'py>,
        segments: Vec<Bound<'py, PyAny>>,
        dtype: &str,
    ) -> PyResult<()> {
        let inner = &self.inner;
        with_views!(segments, dtype, views => {
            let batch = Batch::from_views(&views).map_err(to_py)?;
            py.detach(|| inner.validate(&batch)).map_err(to_py)
        })
    }

    /// Pipelined mode, this rank's round: [signs (P) | signed sum (d)] float64 against the current s.
    fn own_round<'py>(
        &self,
        py: Python<'py>,
        segments: Vec<Bound<'py, PyAny>>,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let inner = &self.inner;
        let out = with_views!(segments, dtype, views => {
            let batch = Batch::from_views(&views).map_err(to_py)?;
            py.detach(|| inner.own_round(&batch)).map_err(to_py)
        })?;
        Ok(out.into_pyarray(py))
    }

    /// Pipelined mode, after the W rounds: place every shard's pairs with the signs (W x P float64).
    fn place_step<'py>(
        &mut self,
        py: Python<'py>,
        segments: Vec<Bound<'py, PyAny>>,
        dtype: &str,
        signs: PyReadonlyArray1<'py, f64>,
    ) -> PyResult<()> {
        let sg = flat_f64(&signs, "the signs")?;
        let inner = &mut self.inner;
        with_views!(segments, dtype, views => {
            let batch = Batch::from_views(&views).map_err(to_py)?;
            py.detach(|| inner.place_step(&batch, sg)).map_err(to_py)
        })
    }

    /// Put back a running sum saved before a step that failed half way.
    fn restore_running_sum(&mut self, s: PyReadonlyArray1<'_, f64>) -> PyResult<()> {
        let v = flat_f64(&s, "the running sum")?;
        self.inner.restore_running_sum(v).map_err(to_py)
    }

    /// Efficient mode: s += the all-reduced signed sum (d float64).
    fn add_sum(&mut self, total: PyReadonlyArray1<'_, f64>) -> PyResult<()> {
        let t = flat_f64(&total, "the signed sum")?;
        self.inner.add_sum(t).map_err(to_py)
    }

    /// The replicated state as bytes: equal on every rank after every step.
    fn replica_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, pyo3::types::PyBytes> {
        pyo3::types::PyBytes::new(py, &self.inner.replica_bytes())
    }

    /// The shared running sum s (float64; empty before the first step).
    fn running_sum<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.inner.running_sum())
    }

    #[getter]
    fn cursor(&self) -> usize {
        self.inner.cursor()
    }

    #[getter]
    fn is_open(&self) -> bool {
        self.inner.is_open()
    }

    #[getter]
    fn dim(&self) -> Option<usize> {
        self.inner.dim()
    }

    #[getter]
    fn epochs_begun(&self) -> u64 {
        self.inner.epochs_begun()
    }

    /// This rank's order server as bytes (replicated state plus this rank's open-pair gradient).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, pyo3::types::PyBytes> {
        let inner = &self.inner;
        let bytes = py.detach(|| inner.to_bytes());
        pyo3::types::PyBytes::new(py, &bytes)
    }

    /// Replace this order server by one restored from `to_bytes` output. Refused (StateDictError, and
    /// nothing changes) when the bytes are corrupted or are for another world size, rank or shard length.
    fn load_bytes(&mut self, py: Python<'_>, bytes: &[u8]) -> PyResult<()> {
        let restored = py
            .detach(|| crate::coordinated::Coordinated::from_bytes(bytes))
            .map_err(to_py)?;
        let (have, want) = (
            (restored.world(), restored.rank(), restored.shard_len()),
            (
                self.inner.world(),
                self.inner.rank(),
                self.inner.shard_len(),
            ),
        );
        if have != want {
            return Err(StateDictError::new_err(format!(
                "this checkpoint is for (world, rank, shard length) = {have:?}, this sampler is {want:?}"
            )));
        }
        self.inner = restored;
        Ok(())
    }
}

fn register_coordinated(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeCoordinated>()
}
