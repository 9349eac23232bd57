//! A backend buffer with its dtype and shape.

use crate::{Backend, DType, Result, invalid};

/// A buffer on a backend, with the dtype and row-major shape it holds.
pub struct Tensor<B: Backend + ?Sized> {
    /// The backend's buffer.
    pub buf: B::Buffer,
    /// Element type.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

impl<B: Backend + ?Sized> Tensor<B> {
    /// Allocates an uninitialised tensor.
    pub fn alloc(backend: &B, dtype: DType, shape: &[usize]) -> Result<Self> {
        Ok(Tensor { buf: backend.alloc(dtype, shape)?, dtype, shape: shape.to_vec() })
    }

    /// Copies little-endian `bytes` to a new tensor; their length must match the shape.
    pub fn upload(backend: &B, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Self> {
        let want = shape.iter().product::<usize>() * dtype.size();
        if bytes.len() != want {
            return invalid!("a {dtype} tensor of shape {shape:?} needs {want} bytes, got {}", bytes.len());
        }
        Ok(Tensor { buf: backend.upload(dtype, shape, bytes)?, dtype, shape: shape.to_vec() })
    }

    /// Uploads f32 values, encoded as `dtype` (f32, f16 or bf16).
    pub fn from_f32(backend: &B, dtype: DType, shape: &[usize], values: &[f32]) -> Result<Self> {
        if !dtype.is_float() {
            return invalid!("from_f32 makes float tensors, not {dtype}");
        }
        Self::upload(backend, dtype, shape, &dtype.encode(values))
    }

    /// Uploads u32 values.
    pub fn from_u32(backend: &B, shape: &[usize], values: &[u32]) -> Result<Self> {
        Self::upload(backend, DType::U32, shape, bytemuck::cast_slice(values))
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype.size()
    }

    /// Downloads the raw little-endian bytes (blocks until enqueued work is done).
    pub fn to_bytes(&self, backend: &B) -> Result<Vec<u8>> {
        let mut host = vec![0u8; self.bytes()];
        backend.download(&self.buf, &mut host)?;
        Ok(host)
    }

    /// Downloads a float tensor as f32 values.
    pub fn to_f32(&self, backend: &B) -> Result<Vec<f32>> {
        if !self.dtype.is_float() {
            return invalid!("to_f32 reads float tensors, this one is {}", self.dtype);
        }
        Ok(self.dtype.decode(&self.to_bytes(backend)?))
    }

    /// Downloads a u32 tensor.
    pub fn to_u32(&self, backend: &B) -> Result<Vec<u32>> {
        if self.dtype != DType::U32 {
            return invalid!("to_u32 reads u32 tensors, this one is {}", self.dtype);
        }
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes(backend)?))
    }
}
