//! Element types and shapes. No math lives here.

use std::fmt;

/// Storage type of a tensor. Compute is f32; weights stay in the type they were loaded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Converts little-endian storage bytes of this dtype to f32 values.
    /// `bytes.len()` must be a multiple of the element size; the tail is ignored otherwise.
    pub fn to_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.clear();
        match self {
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor shape, outermost dimension first (PyTorch order).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements, or `None` on overflow.
    pub fn numel(&self) -> Option<usize> {
        self.0.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_each_dtype_to_f32() {
        let mut out = Vec::new();
        DType::F32.to_f32(&1.5f32.to_le_bytes(), &mut out);
        assert_eq!(out, [1.5]);
        DType::F16.to_f32(&half::f16::from_f32(-2.25).to_le_bytes(), &mut out);
        assert_eq!(out, [-2.25]);
        DType::BF16.to_f32(&half::bf16::from_f32(3.0).to_le_bytes(), &mut out);
        assert_eq!(out, [3.0]);
    }

    #[test]
    fn numel_detects_overflow() {
        assert_eq!(Shape(vec![2, 3, 4]).numel(), Some(24));
        assert_eq!(Shape(vec![]).numel(), Some(1));
        assert_eq!(Shape(vec![usize::MAX, 2]).numel(), None);
    }
}
