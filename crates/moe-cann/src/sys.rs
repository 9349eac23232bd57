//! Raw `extern "C"` declarations of the AscendCL runtime, the aclnn tensor descriptors and the
//! aclnn operators moe-cann maps onto. Compiled only with `--cfg moe_cann_toolkit` (set by
//! `build.rs` when the `ascend` feature finds a toolkit), so the linking path is real.
//!
//! **Unverified here.** No Ascend toolkit or NPU existed where this was written: the declarations
//! were transcribed from public CANN headers and operator docs (`acl/acl_rt.h`, `acl/acl_base.h`,
//! `aclnn/acl_meta.h`, the `aclnnop/*.h` operator headers of CANN 8.x, and the ops-transformer
//! operator pages). They compile, and the three the probe uses (`aclInit`, `aclrtGetDeviceCount`,
//! `aclGetRecentErrMsg`) were linked and called against a stand-in `libascendcl.so` built for the
//! test, never against a real toolkit. Check each against the headers of the toolkit you build with
//! (`$ASCEND_TOOLKIT_HOME/include`); signatures of aclnn operators change between CANN releases
//! (hence the `V2`..`V5` names).
//!
//! Conventions of every aclnn operator (the "two-phase" interface): first
//! `aclnnXxxGetWorkspaceSize(args.., &workspaceSize, &executor)` checks the arguments and plans the
//! kernel; then the caller provides `workspaceSize` bytes of device memory and calls
//! `aclnnXxx(workspace, workspaceSize, executor, stream)`, which enqueues the kernel on `stream`.
//! The executor is consumed by that second call. Status `0` is success.
//!
//! Which shared library exports which symbol: `aclrt*`/`aclInit` come from `libascendcl.so`,
//! `aclCreateTensor` and friends from `libnnopbase.so`, the `aclnn*` operators from `libopapi.so`
//! (the split ggml's CANN backend links). Unconfirmed: whether newer CANN releases move the MoE
//! operators into a separate per-package library.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};

/// AscendCL runtime status (`typedef int aclError`); [`ACL_SUCCESS`] is success.
pub type aclError = c_int;
/// aclnn operator status (`typedef int32_t aclnnStatus`); 0 is success.
pub type aclnnStatus = i32;
/// A stream handle (`typedef void *aclrtStream`).
pub type aclrtStream = *mut c_void;
/// `enum aclrtMemcpyKind`.
pub type aclrtMemcpyKind = c_int;
/// `enum aclrtMemMallocPolicy`.
pub type aclrtMemMallocPolicy = c_int;
/// `enum aclrtMemAttr`.
pub type aclrtMemAttr = c_int;
/// `enum aclDataType`.
pub type aclDataType = c_int;
/// `enum aclFormat`.
pub type aclFormat = c_int;

/// An aclnn tensor descriptor (shape, strides, dtype, format, device pointer); opaque.
#[repr(C)]
pub struct aclTensor {
    _opaque: [u8; 0],
}

/// A list of tensor descriptors (the `x`, `weight`, `out` arguments of grouped matmul); opaque.
#[repr(C)]
pub struct aclTensorList {
    _opaque: [u8; 0],
}

/// A planned operator call, returned by the first phase and consumed by the second; opaque.
#[repr(C)]
pub struct aclOpExecutor {
    _opaque: [u8; 0],
}

/// Success for every AscendCL call.
pub const ACL_SUCCESS: aclError = 0;
/// `aclInit` called twice in one process; harmless for a probe. unconfirmed: the value, taken from
/// the `ACL_ERROR_*` numbering of `acl_base.h` (100000 invalid parameter, 100001 uninitialised,
/// 100002 repeat initialise) as third-party copies of the header show it.
pub const ACL_ERROR_REPEAT_INITIALIZE: aclError = 100002;
/// `aclrtMemcpy` kind: host to device.
pub const ACL_MEMCPY_HOST_TO_DEVICE: aclrtMemcpyKind = 1;
/// `aclrtMemcpy` kind: device to host.
pub const ACL_MEMCPY_DEVICE_TO_HOST: aclrtMemcpyKind = 2;
/// `aclrtMemcpy` kind: device to device.
pub const ACL_MEMCPY_DEVICE_TO_DEVICE: aclrtMemcpyKind = 3;
/// `aclrtMalloc` policy: huge pages first, normal pages when huge pages run out.
pub const ACL_MEM_MALLOC_HUGE_FIRST: aclrtMemMallocPolicy = 0;
/// `aclrtGetMemInfo` attribute: HBM (the NPU's device memory).
pub const ACL_HBM_MEM: aclrtMemAttr = 1;
/// `aclDataType` float32.
pub const ACL_FLOAT: aclDataType = 0;
/// `aclDataType` float16.
pub const ACL_FLOAT16: aclDataType = 1;
/// `aclDataType` int32 (expert ids and dispatch indices; moe-hal's u32 values below 2^31 have the
/// same bits).
pub const ACL_INT32: aclDataType = 3;
/// `aclDataType` int64 (the `groupList` of grouped matmul).
pub const ACL_INT64: aclDataType = 9;
/// `aclDataType` bfloat16.
pub const ACL_BF16: aclDataType = 27;
/// `aclFormat` ND: plain row-major with explicit strides, moe-hal's layout.
pub const ACL_FORMAT_ND: aclFormat = 2;
/// `aclFormat` FRACTAL_NZ: the cube unit's tiled weight layout (made by `aclnnTransMatmulWeight`).
pub const ACL_FORMAT_FRACTAL_NZ: aclFormat = 29;

unsafe extern "C" {
    // ---- libascendcl: process, devices, streams, memory ----

    /// `aclError aclInit(const char *configPath)`: once per process; `NULL` for no config file.
    pub fn aclInit(config_path: *const c_char) -> aclError;
    /// `aclError aclFinalize(void)`: once, at process end.
    pub fn aclFinalize() -> aclError;
    /// `const char *aclGetRecentErrMsg(void)`: the text of the last failure on this thread, or NULL.
    pub fn aclGetRecentErrMsg() -> *const c_char;
    /// `aclError aclrtGetDeviceCount(uint32_t *count)`.
    pub fn aclrtGetDeviceCount(count: *mut u32) -> aclError;
    /// `aclError aclrtSetDevice(int32_t deviceId)`: binds the device (and its default context) to
    /// the calling thread.
    pub fn aclrtSetDevice(device_id: i32) -> aclError;
    /// `aclError aclrtResetDevice(int32_t deviceId)`.
    pub fn aclrtResetDevice(device_id: i32) -> aclError;
    /// `aclError aclrtCreateStream(aclrtStream *stream)`.
    pub fn aclrtCreateStream(stream: *mut aclrtStream) -> aclError;
    /// `aclError aclrtDestroyStream(aclrtStream stream)`.
    pub fn aclrtDestroyStream(stream: aclrtStream) -> aclError;
    /// `aclError aclrtSynchronizeStream(aclrtStream stream)`: blocks until the stream drains and
    /// reports a failure of any kernel on it.
    pub fn aclrtSynchronizeStream(stream: aclrtStream) -> aclError;
    /// `aclError aclrtMalloc(void **devPtr, size_t size, aclrtMemMallocPolicy policy)`.
    pub fn aclrtMalloc(dev_ptr: *mut *mut c_void, size: usize, policy: aclrtMemMallocPolicy) -> aclError;
    /// `aclError aclrtFree(void *devPtr)`.
    pub fn aclrtFree(dev_ptr: *mut c_void) -> aclError;
    /// `aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count,
    /// aclrtMemcpyKind kind)`: synchronous copy.
    pub fn aclrtMemcpy(dst: *mut c_void, dest_max: usize, src: *const c_void, count: usize, kind: aclrtMemcpyKind) -> aclError;
    /// `aclError aclrtGetMemInfo(aclrtMemAttr attr, size_t *free, size_t *total)`.
    pub fn aclrtGetMemInfo(attr: aclrtMemAttr, free: *mut usize, total: *mut usize) -> aclError;

    // ---- libnnopbase: tensor descriptors ----

    /// `aclTensor *aclCreateTensor(const int64_t *viewDims, uint64_t viewDimsNum, aclDataType
    /// dataType, const int64_t *stride, int64_t offset, aclFormat format, const int64_t
    /// *storageDims, uint64_t storageDimsNum, void *tensorData)`. `offset` is in elements; a
    /// transposed view is the same storage with swapped strides.
    pub fn aclCreateTensor(
        view_dims: *const i64,
        view_dims_num: u64,
        data_type: aclDataType,
        stride: *const i64,
        offset: i64,
        format: aclFormat,
        storage_dims: *const i64,
        storage_dims_num: u64,
        tensor_data: *mut c_void,
    ) -> *mut aclTensor;
    /// `aclnnStatus aclDestroyTensor(const aclTensor *tensor)` (the descriptor, not the memory).
    pub fn aclDestroyTensor(tensor: *const aclTensor) -> aclnnStatus;
    /// `aclTensorList *aclCreateTensorList(const aclTensor *const *value, uint64_t size)`.
    pub fn aclCreateTensorList(value: *const *const aclTensor, size: u64) -> *mut aclTensorList;
    /// `aclnnStatus aclDestroyTensorList(const aclTensorList *array)`.
    pub fn aclDestroyTensorList(list: *const aclTensorList) -> aclnnStatus;

    // ---- libopapi: the operators (two-phase) ----

    /// Phase 1 of `aclnnMoeGatingTopKSoftmax`: softmax over the experts, then top-k.
    pub fn aclnnMoeGatingTopKSoftmaxGetWorkspaceSize(
        x: *const aclTensor,
        finished_optional: *const aclTensor,
        k: i64,
        y_out: *const aclTensor,
        expert_idx_out: *const aclTensor,
        row_idx_out: *const aclTensor,
        workspace_size: *mut u64,
        executor: *mut *mut aclOpExecutor,
    ) -> aclnnStatus;
    /// Phase 2 of `aclnnMoeGatingTopKSoftmax`.
    pub fn aclnnMoeGatingTopKSoftmax(
        workspace: *mut c_void,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        stream: aclrtStream,
    ) -> aclnnStatus;

    /// Phase 1 of `aclnnMoeGatingTopKSoftmaxV2`: `renorm = 1` takes the top-k of the logits and
    /// then a softmax over those k (the renormalised softmax top-k).
    pub fn aclnnMoeGatingTopKSoftmaxV2GetWorkspaceSize(
        x: *const aclTensor,
        finished_optional: *const aclTensor,
        k: i64,
        renorm: i64,
        output_softmax_result_flag: bool,
        y_out: *mut aclTensor,
        expert_idx_out: *mut aclTensor,
        softmax_out: *mut aclTensor,
        workspace_size: *mut u64,
        executor: *mut *mut aclOpExecutor,
    ) -> aclnnStatus;
    /// Phase 2 of `aclnnMoeGatingTopKSoftmaxV2`.
    pub fn aclnnMoeGatingTopKSoftmaxV2(
        workspace: *mut c_void,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        stream: aclrtStream,
    ) -> aclnnStatus;

    /// Phase 1 of `aclnnMoeGatingTopK`: sigmoid (or softmax), + bias, group-limited top-k,
    /// `y / (sum + eps) * routedScalingFactor`.
    pub fn aclnnMoeGatingTopKGetWorkspaceSize(
        x: *const aclTensor,
        bias_optional: *const aclTensor,
        k: i64,
        k_group: i64,
        group_count: i64,
        group_select_mode: i64,
        renorm: i64,
        norm_type: i64,
        out_flag: bool,
        routed_scaling_factor: f64,
        eps: f64,
        y_out: *const aclTensor,
        expert_idx_out: *const aclTensor,
        out_out: *const aclTensor,
        workspace_size: *mut u64,
        executor: *mut *mut aclOpExecutor,
    ) -> aclnnStatus;
    /// Phase 2 of `aclnnMoeGatingTopK`.
    pub fn aclnnMoeGatingTopK(
        workspace: *mut c_void,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        stream: aclrtStream,
    ) -> aclnnStatus;

    /// Phase 1 of `aclnnMoeInitRoutingV2`: sort pairs by expert, `expandedRowIdxOut` (our
    /// `row_index`), gathered rows, per-expert counts or cumulative counts.
    pub fn aclnnMoeInitRoutingV2GetWorkspaceSize(
        x: *const aclTensor,
        expert_idx: *const aclTensor,
        active_num: i64,
        expert_capacity: i64,
        expert_num: i64,
        drop_pad_mode: i64,
        expert_tokens_count_or_cumsum_flag: i64,
        expert_tokens_before_capacity_flag: bool,
        expanded_x_out: *const aclTensor,
        expanded_row_idx_out: *const aclTensor,
        expert_tokens_count_or_cumsum_out: *const aclTensor,
        expert_tokens_before_capacity_out: *const aclTensor,
        workspace_size: *mut u64,
        executor: *mut *mut aclOpExecutor,
    ) -> aclnnStatus;
    /// Phase 2 of `aclnnMoeInitRoutingV2`.
    pub fn aclnnMoeInitRoutingV2(
        workspace: *mut c_void,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        stream: aclrtStream,
    ) -> aclnnStatus;

    /// Phase 1 of `aclnnGroupedMatmulV4`: per group `y_i = x_i · weight_i (+ bias_i)`; with
    /// `groupType = 0` (M axis), single tensors and `groupListType = 0` the group list is
    /// cumulative, moe-hal's `expert_offsets[1..]` as int64.
    pub fn aclnnGroupedMatmulV4GetWorkspaceSize(
        x: *const aclTensorList,
        weight: *const aclTensorList,
        bias_optional: *const aclTensorList,
        scale_optional: *const aclTensorList,
        offset_optional: *const aclTensorList,
        antiquant_scale_optional: *const aclTensorList,
        antiquant_offset_optional: *const aclTensorList,
        per_token_scale_optional: *const aclTensorList,
        group_list_optional: *const aclTensor,
        activation_input_optional: *const aclTensorList,
        activation_quant_scale_optional: *const aclTensorList,
        activation_quant_offset_optional: *const aclTensorList,
        split_item: i64,
        group_type: i64,
        group_list_type: i64,
        act_type: i64,
        out: *mut aclTensorList,
        activation_feature_out_optional: *mut aclTensorList,
        dyn_quant_scale_out_optional: *mut aclTensorList,
        workspace_size: *mut u64,
        executor: *mut *mut aclOpExecutor,
    ) -> aclnnStatus;
    /// Phase 2 of `aclnnGroupedMatmulV4`.
    pub fn aclnnGroupedMatmulV4(
        workspace: *mut c_void,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        stream: aclrtStream,
    ) -> aclnnStatus;

    /// Phase 1 of `aclnnSwiGlu`: `out = swish(A) * B`, `A`/`B` the halves of `x` along `dim`.
    pub fn aclnnSwiGluGetWorkspaceSize(
        x: *const aclTensor,
        dim: i64,
        out: *const aclTensor,
        workspace_size: *mut u64,
        executor: *mut *mut aclOpExecutor,
    ) -> aclnnStatus;
    /// Phase 2 of `aclnnSwiGlu`.
    pub fn aclnnSwiGlu(workspace: *mut c_void, workspace_size: u64, executor: *mut aclOpExecutor, stream: aclrtStream) -> aclnnStatus;

    /// Phase 1 of `aclnnMoeFinalizeRoutingV2`:
    /// `out[i] = x1[i] + x2[i] + sum_k scales[i,k] * (expandedX[expandedRowIdx[..]] + bias[e])`.
    pub fn aclnnMoeFinalizeRoutingV2GetWorkspaceSize(
        expanded_x: *const aclTensor,
        expanded_row_idx: *const aclTensor,
        x1_optional: *const aclTensor,
        x2_optional: *const aclTensor,
        bias_optional: *const aclTensor,
        scales_optional: *const aclTensor,
        expert_idx_optional: *const aclTensor,
        drop_pad_mode: i64,
        out: *const aclTensor,
        workspace_size: *mut u64,
        executor: *mut *mut aclOpExecutor,
    ) -> aclnnStatus;
    /// Phase 2 of `aclnnMoeFinalizeRoutingV2`.
    pub fn aclnnMoeFinalizeRoutingV2(
        workspace: *mut c_void,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        stream: aclrtStream,
    ) -> aclnnStatus;

    /// Phase 1 of `aclnnTransMatmulWeight`: rewrites a weight from ND to FRACTAL_NZ in place (the
    /// buffer must be sized for the NZ layout, `aclnnCalculateMatmulWeightSizeV2`).
    pub fn aclnnTransMatmulWeightGetWorkspaceSize(
        mm_weight_ref: *mut aclTensor,
        workspace_size: *mut u64,
        executor: *mut *mut aclOpExecutor,
    ) -> aclnnStatus;
    /// Phase 2 of `aclnnTransMatmulWeight`.
    pub fn aclnnTransMatmulWeight(
        workspace: *mut c_void,
        workspace_size: u64,
        executor: *mut aclOpExecutor,
        stream: aclrtStream,
    ) -> aclnnStatus;
}

/// The text of the last AscendCL failure on this thread (empty when there is none).
pub fn recent_error() -> String {
    // SAFETY: aclGetRecentErrMsg takes no arguments and returns NULL or a NUL-terminated string
    // owned by the runtime, valid until the next ACL call on this thread; it is copied at once.
    unsafe {
        let p = aclGetRecentErrMsg();
        if p.is_null() { String::new() } else { std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned() }
    }
}
