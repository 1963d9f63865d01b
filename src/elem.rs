//! Element types. Gradients arrive as f32, f64, f16 or bf16 (the two 16-bit types are widened inside the
//! kernels, never copied); the balancing state is kept in f32 or f64. Every product is formed in f64.

use half::{bf16, f16};

/// A gradient element type the kernels can read.
pub trait GradElem: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    fn to_f64(self) -> f64;
}

impl GradElem for f32 {
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl GradElem for f64 {
    const NAME: &'static str = "float64";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}
impl GradElem for f16 {
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
}
impl GradElem for bf16 {
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
}

/// The element type of the running sums and means.
pub trait StateElem: GradElem + Default + PartialEq + std::fmt::Debug {
    fn from_f64(x: f64) -> Self;
}
impl StateElem for f32 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}
impl StateElem for f64 {
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
