//! A backend buffer with its dtype and shape.

use crate::{Backend, DType, HostTensor, Result, invalid};

/// The scales of a block-scaled weight ([`DType::F8E4M3`]), on the host (`T` = [`HostTensor`])
/// or on a device (`T` = [`Tensor`]): `tensor` is f32 of shape
/// [`crate::fp8::scale_shape`]`(weight shape, block)`, one scale per `block = [rows, columns]` of
/// the weight's last two dimensions, and element `[.., r, c]` of the weight is
/// `E4M3[q] * tensor[.., r / block[0], c / block[1]]` (see [`crate::fp8`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockScales<T> {
    /// Rows and columns of one block (DeepSeek: `[128, 128]`).
    pub block: [usize; 2],
    /// The f32 scale grid.
    pub tensor: T,
}

/// A buffer on a backend, with the dtype and row-major shape it holds.
pub struct Tensor<B: Backend + ?Sized> {
    /// The backend's buffer.
    pub buf: B::Buffer,
    /// Element type.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// The block scales of a [`DType::F8E4M3`] weight; `None` for every other dtype.
    pub scales: Option<Box<BlockScales<Tensor<B>>>>,
}

impl<B: Backend + ?Sized> Tensor<B> {
    /// Allocates an uninitialised tensor.
    pub fn alloc(backend: &B, dtype: DType, shape: &[usize]) -> Result<Self> {
        if dtype.is_block_scaled() {
            return invalid!("an {dtype} tensor needs its block scales: upload it with Tensor::from_host");
        }
        dtype.tensor_bytes(shape)?;
        Ok(Tensor { buf: backend.alloc(dtype, shape)?, dtype, shape: shape.to_vec(), scales: None })
    }

    /// Copies little-endian `bytes` to a new tensor; their length must match the shape. A
    /// block-scaled weight ([`DType::F8E4M3`]) goes through [`Tensor::from_host`] instead.
    pub fn upload(backend: &B, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Self> {
        if dtype.is_block_scaled() {
            return invalid!("an {dtype} tensor needs its block scales: upload it with Tensor::from_host");
        }
        let want = dtype.tensor_bytes(shape)?;
        if bytes.len() != want {
            return invalid!("a {dtype} tensor of shape {shape:?} needs {want} bytes, got {}", bytes.len());
        }
        Ok(Tensor { buf: backend.upload(dtype, shape, bytes)?, dtype, shape: shape.to_vec(), scales: None })
    }

    /// Copies a host tensor, and its block scales when it has them, to the backend.
    pub fn from_host(backend: &B, host: &HostTensor) -> Result<Self> {
        host.check()?;
        let scales = match &host.scales {
            Some(s) => Some(Box::new(BlockScales { block: s.block, tensor: Tensor::from_host(backend, &s.tensor)? })),
            None => None,
        };
        Ok(Tensor { buf: backend.upload(host.dtype, &host.shape, &host.data)?, dtype: host.dtype, shape: host.shape.clone(), scales })
    }

    /// Uploads f32 values, encoded as `dtype` (f32, f16, bf16 or f8_e4m3).
    /// [`DType::F8E4M3`] is quantized with [`crate::fp8::DEFAULT_BLOCK`] scales
    /// ([`HostTensor::from_f32`]).
    pub fn from_f32(backend: &B, dtype: DType, shape: &[usize], values: &[f32]) -> Result<Self> {
        if dtype.is_block_scaled() {
            return Self::from_host(backend, &HostTensor::from_f32(dtype, shape, values)?);
        }
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

    /// Size in bytes (of the elements; block scales are [`Tensor::scales`]).
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype.size()
    }

    /// Checks the block scales against the dtype and shape (see [`crate::fp8::check_scales`]);
    /// `what` names the tensor in the error.
    pub fn check_scales(&self, what: &str) -> Result<()> {
        let scales = self.scales.as_ref().map(|s| (s.block, s.tensor.dtype, &s.tensor.shape[..]));
        crate::fp8::check_scales(what, self.dtype, &self.shape, scales)
    }

    /// Downloads the raw little-endian bytes (blocks until enqueued work is done).
    pub fn to_bytes(&self, backend: &B) -> Result<Vec<u8>> {
        let mut host = vec![0u8; self.bytes()];
        backend.download(&self.buf, &mut host)?;
        Ok(host)
    }

    /// Downloads a float tensor as f32 values (a block-scaled one with its scales applied).
    pub fn to_f32(&self, backend: &B) -> Result<Vec<f32>> {
        if !self.dtype.is_weight() {
            return invalid!("to_f32 reads float tensors, this one is {}", self.dtype);
        }
        self.to_host(backend).map(|h| h.to_f32())
    }

    /// Downloads the tensor, and its block scales, to a [`HostTensor`].
    pub fn to_host(&self, backend: &B) -> Result<HostTensor> {
        let scales = match &self.scales {
            Some(s) => Some(Box::new(BlockScales { block: s.block, tensor: s.tensor.to_host(backend)? })),
            None => None,
        };
        Ok(HostTensor { dtype: self.dtype, shape: self.shape.clone(), data: self.to_bytes(backend)?, scales })
    }

    /// Downloads a u32 tensor.
    pub fn to_u32(&self, backend: &B) -> Result<Vec<u32>> {
        if self.dtype != DType::U32 {
            return invalid!("to_u32 reads u32 tensors, this one is {}", self.dtype);
        }
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes(backend)?))
    }
}
