//! Element types. Gradients arrive as f32, f64, f16 or bf16 (the two 16-bit types are widened inside the
//! kernels, never copied); the balancing state is kept in f32 or f64. Every product that enters a dot
//! product is formed and summed in f64. The elementwise updates (z = a - b, s + coef z, m + g / n) are
//! rounded in the state's precision: in f32 when the state is f32 and every gradient operand is at most
//! f32 wide (`GradElem::NARROW`), else in f64. Doing the f32 case in f32 rather than in f64 then
//! rounding is what lets the kernels run at memory speed: conversions between f32 and f64 were most
//! of the work per element.

use half::{bf16, f16};

/// A gradient element type the kernels can read.
pub trait GradElem: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    /// Whether every value converts to f32 exactly (f32, f16, bf16).
    const NARROW: bool;
    fn to_f64(self) -> f64;
    /// The value as f32: exact when `NARROW`; never used otherwise.
    fn to_f32(self) -> f32;
}

impl GradElem for f32 {
    const NAME: &'static str = "float32";
    const NARROW: bool = true;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl GradElem for f64 {
    const NAME: &'static str = "float64";
    const NARROW: bool = false;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}
impl GradElem for f16 {
    const NAME: &'static str = "float16";
    const NARROW: bool = true;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl GradElem for bf16 {
    const NAME: &'static str = "bfloat16";
    const NARROW: bool = true;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// The element type of the running sums and means.
pub trait StateElem: GradElem + Default + PartialEq + std::fmt::Debug {
    /// Whether this is f32 (the elementwise updates may then run in f32; see the module doc).
    const F32: bool;
    fn from_f64(x: f64) -> Self;
    /// From f32: exact for both state types.
    fn from_f32(x: f32) -> Self;
}
impl StateElem for f32 {
    const F32: bool = true;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}
impl StateElem for f64 {
    const F32: bool = false;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// Working memory kept between calls only to avoid reallocating it. It is not state: it takes no part
/// in equality or checkpoints.
#[derive(Clone, Default)]
pub struct Scratch<T>(pub T);

impl<T> PartialEq for Scratch<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> std::fmt::Debug for Scratch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

/// `x` as f32 when T is f32 (None otherwise): lets f32-only kernels take a generic caller's buffers
/// without copying.
pub(crate) fn as_f32<T: 'static>(x: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so this is the identity cast.
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

/// `as_f32` for a unique borrow.
pub(crate) fn as_f32_mut<T: 'static>(x: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so this is the identity cast of a unique borrow.
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
}
