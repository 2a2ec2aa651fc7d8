//! burn's operation fusion (`--features fusion`, opt-in, for measuring it against our kernels): with it the
//! CubeCL backends are burn-fusion's decorator `Fusion<CubeBackend<…>>`. Our CubeCL kernels are not registered as
//! fusion custom ops, so they do not run here: every op is the reference, whose elementwise chains burn-fusion
//! fuses, except attention, which runs blockwise on the backend's GEMMs (generic over the backend: memory linear
//! in the sequence, as in the default build).

use burn::backend::Autodiff;
use burn::tensor::Tensor;
use burn_fusion::{Fusion, FusionBackend};

use super::blockwise::{self, rows};
use super::{reference, Attention, Kernels, Qkv};

impl<B: FusionBackend + Kernels> Kernels for Fusion<B> {
    fn memory_reserved(device: &Self::Device) -> Option<u64> {
        B::memory_reserved(device)
    }
}

impl<B: FusionBackend + Kernels> Kernels for Autodiff<Fusion<B>> {
    fn rope_attention(qkv: Qkv<Self>, att: &Attention<Self>) -> Tensor<Self, 2> {
        if !super::enabled() || !blockwise::covers(&att.spec) {
            return reference::attention(qkv, att);
        }
        let (q, k, v) = reference::rope_heads(qkv, att);
        rows(blockwise::attention(
            q,
            k,
            v,
            &att.spec,
            blockwise::BLOCK_ROWS,
        ))
    }
}
