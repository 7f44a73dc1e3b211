/*
 * Embeddings on the GPU: forward out (B, T, C) = wte[inp[b, t]] (+ wpe[t]), and the backward
 * that scatters the gradient back into the embedding tables. CPU reference: encoder_forward /
 * encoder_backward in ops_cpu.c.
 *
 * The residual stream is fp32 or bf16 (TR; see model_cuda.cu): the forward writes it from the
 * bf16 weight copies, adding the two embeddings in fp32, and the backward reads the stream's
 * gradient in the same type into fp32 parameter gradients.
 */
#ifndef LLMC_ENCODER_CUH
#define LLMC_ENCODER_CUH
#include "cuda_common.h"

// out (N, C), N = B*T: one thread per (row, channel). wpe (maxT, C) may be NULL.
template <typename TR>
__global__ void encoder_forward_kernel(TR *out, const int *inp, const floatX *wte, const floatX *wpe,
                                       int N, int T, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    int bt = (int)(idx / C), c = (int)(idx % C);
    float value = to_float(wte[(size_t)inp[bt] * C + c]);
    if (wpe) value += to_float(wpe[(size_t)(bt % T) * C + c]);
    out[idx] = from_float<TR>(value);
}

template <typename TR>
static inline void encoder_forward(TR *out, const int *inp, const floatX *wte, const floatX *wpe,
                                   int B, int T, int C, cudaStream_t stream) {
    size_t n = (size_t)B * T * C;
    encoder_forward_kernel<TR><<<ceil_div((long long)n, 256), 256, 0, stream>>>(out, inp, wte, wpe, B * T, T, C);
    cudaCheckLaunch();
}

// dwte (Vp, C) += dout (N, C) scattered by token. Several positions may hold one token, so the
// adds are atomic (fp32; the order of the adds, and so the last bits, may vary between runs).
template <typename TR>
__global__ void encoder_backward_wte_kernel(float *dwte, const TR *dout, const int *inp, int N, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    int bt = (int)(idx / C), c = (int)(idx % C);
    atomicAdd(&dwte[(size_t)inp[bt] * C + c], to_float(dout[idx]));
}

// dwpe (maxT, C) += sum over b of dout (B, T, C): one thread per (t, c), the sum over b in order.
template <typename TR>
__global__ void encoder_backward_wpe_kernel(float *dwpe, const TR *dout, int B, int T, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * C) return;
    float sum = 0.0f;
    for (int b = 0; b < B; b++) sum += to_float(dout[(size_t)b * T * C + idx]);
    dwpe[idx] += sum;
}

// dwte or dwpe may be NULL (not needed).
template <typename TR>
static inline void encoder_backward(float *dwte, float *dwpe, const TR *dout, const int *inp,
                                    int B, int T, int C, cudaStream_t stream) {
    if (dwte) {
        size_t n = (size_t)B * T * C;
        encoder_backward_wte_kernel<TR><<<ceil_div((long long)n, 256), 256, 0, stream>>>(dwte, dout, inp, B * T, C);
        cudaCheckLaunch();
    }
    if (dwpe) {
        size_t n = (size_t)T * C;
        encoder_backward_wpe_kernel<TR><<<ceil_div((long long)n, 256), 256, 0, stream>>>(dwpe, dout, B, T, C);
        cudaCheckLaunch();
    }
}
#endif
