/*
 * Runs the elementwise kernels of llmc/swiglu.cuh, llmc/rope.cuh, llmc/gelu.cuh, llmc/adamw.cuh and the
 * gradient-norm kernels of llmc/global_norm.cuh on the CPU
 * through their host entry points: the scalar kernels, the 8-wide ones and the pick between them,
 * so that their indexing, 16-byte packing and math are checked on a machine without a GPU
 * (test/test_elementwise_emu.py compares the results with a NumPy float64 oracle).
 *
 * The kernels' source is compiled as C++ under the GPU emulation of test/gpu_emu.h with the
 * runtime of test/gpu_emu_runtime.h; the test's build concatenates the three headers with each
 * launch rewritten into an emu_launch call (test/gpu_emu.py). Output buffers start as NaN (all
 * bytes 0xff); RoPE works in place on qkv.
 *
 *   elementwise_emu IN OUT forward|reverse
 *     IN : int32 op, kernel (0 scalar, 1 8-wide, 2 picked), misalign (the bf16 buffers start 2
 *          bytes past a 256-byte boundary), d0..d4, then per op:
 *          0 swiglu forward   d0 = N, d1 = F       float32 fc (N, 2F)
 *          1 swiglu backward  d0 = N, d1 = F       float32 fc (N, 2F), dout (N, F)
 *          2 rope forward     d0..d4 = B, T, NH, NKV, HS; float32 theta, qkv (B, T, (NH + 2 NKV) HS)
 *          3 rope backward    as 2
 *          4 gelu forward     d0 = n               float32 inp (n)
 *          5 gelu backward    d0 = n, d1 = in place (dinp aliases dout)   float32 inp (n), dout (n)
 *          6 swiglu forward with the rows' RMSNorm (swiglu_forward_rownorm; kernel ignored)
 *                             d0 = N, d1 = F, d2 = C   float32 fc (N, 2F), x (N, C); eps 1e-5
 *          7 rope forward on the k heads alone (rope_forward_keys; scalar and 8-wide from
 *            head NH on)  as 2
 *          8 adamw            d0 = n (kernel 1: the 4-wide kernel, with the scalar one on the last
 *                             n % 4; misalign: the fp32 arrays start 4 bytes past the boundary)
 *                             float32 lr, beta1, beta2, bc1, bc2, eps, decay, grad_scale, then
 *                             params, grads, m, v (n each)
 *          9 global norm      d0 = n, d1 = pieces P (1..16), d2 = the first P2 of them summed into the
 *                             first partials' slot, the rest into the second (global_norm_pieces, as
 *                             the model's layers; kernel ignored); float32 each piece's offset and
 *                             length (2P), then the gradient (n); misalign: the buffer starts 4 bytes
 *                             past the boundary
 *          (inputs representable in bf16)
 *     OUT: float32 out (N, F) | dfc (N, 2F) | qkv afterwards | out (n) | dinp (n) | out (N, F) | qkv |
 *          params, m, v, bf16 copy (n each) | the pieces' norm (the two slots' partials added by
 *          global_norm_finish_kernel), the same again (a second run), the whole buffer's global_norm
 *   It prints the number of threads its launches started ("threads N"), which tells the kernels
 *   apart where their results are the same bit for bit.
 */
#define EMU_PROGRAM "elementwise_emu"
#define EMU_STATIC_SHARED
#include "gpu_emu_runtime.h"

// a float product rounded once, never contracted into a fused multiply-add (the CUDA intrinsic)
static inline float __fmul_rn(float a, float b) { return a * b; }

// every launch of the headers below goes through here, counting the threads it starts
static size_t launched_threads = 0;
static inline void counted_launch(dim3 grid, int block, size_t smem_bytes, cudaStream_t stream, std::function<void()> body) {
    launched_threads += (size_t)grid.x * grid.y * grid.z * block;
    emu_launch(grid, block, smem_bytes, stream, body);
}
#define emu_launch counted_launch
#include "elementwise_launched.cuh"   // llmc/swiglu.cuh, rope.cuh, gelu.cuh, adamw.cuh, global_norm.cuh, launches rewritten
#undef emu_launch

enum { SWIGLU_FORWARD, SWIGLU_BACKWARD, ROPE_FORWARD, ROPE_BACKWARD, GELU_FORWARD, GELU_BACKWARD, SWIGLU_ROWNORM,
       ROPE_FORWARD_KEYS, ADAMW, GLOBAL_NORM };

// A bf16 device buffer of n elements starting `offset` elements into a 256-byte aligned block,
// holding x (when given) or NaN
static floatX *bf16_buffer(size_t n, int offset, const std::vector<float> *x) {
    floatX *p = (floatX *)device_alloc((n + offset) * 2, 0xff) + offset;
    if (x)
        for (size_t i = 0; i < n; i++) p[i] = to_bf16((*x)[i]);
    return p;
}

int main(int argc, char **argv) {
    // swiglu_forward_rownorm's and global_norm's block_sum partials, global_norm_finish_kernel's sums
    FILE *f = emu_open_input(argc, argv, 2 * 32 * sizeof(float) + 1024 * sizeof(double));
    int32_t h[8];
    if (fread(h, sizeof(int32_t), 8, f) != 8) { fprintf(stderr, "error: %s: no header\n", argv[1]); return 1; }
    int op = h[0], kernel = h[1], offset = h[2] ? 1 : 0;
    const int *d = h + 3;
    if (op < 0 || op > GLOBAL_NORM || kernel < 0 || kernel > 2 || d[0] < 1) {
        fprintf(stderr, "error: %s: bad header op=%d kernel=%d\n", argv[1], op, kernel);
        return 1;
    }
    std::vector<float> y;
    if (op == GLOBAL_NORM) {
        size_t n = (size_t)d[0];
        int P = d[1], first = d[2];
        if (P < 1 || P > GLOBAL_NORM_PIECES || first < 0 || first > P) {
            fprintf(stderr, "error: %s: bad pieces P=%d first=%d\n", argv[1], P, first);
            return 1;
        }
        std::vector<float> ranges = read_floats(f, 2 * (size_t)P, argv[1]), x = read_floats(f, n, argv[1]);
        float *g = (float *)device_alloc((n + offset) * sizeof(float), 0xff) + offset;
        memcpy(g, x.data(), n * sizeof(float));
        NormPieces slot[2];
        memset(slot, 0, sizeof(slot));
        for (int p = 0; p < P; p++) {
            NormPieces &s = slot[p < first ? 0 : 1];
            size_t lo = (size_t)ranges[2 * p], len = (size_t)ranges[2 * p + 1];
            if (lo + len > n) { fprintf(stderr, "error: %s: piece %d past the buffer\n", argv[1], p); return 1; }
            s.ptr[s.count] = g + lo;
            s.n[s.count++] = len;
        }
        float *partial = (float *)device_alloc(2 * GLOBAL_NORM_PIECE_BLOCKS * sizeof(float), 0xff);
        float *whole_partial = (float *)device_alloc(GLOBAL_NORM_BLOCKS * sizeof(float), 0xff);
        float *out = (float *)device_alloc(sizeof(float), 0xff);
        for (int run = 0; run < 2; run++) {
            for (int k = 0; k < 2; k++) global_norm_pieces(partial + k * GLOBAL_NORM_PIECE_BLOCKS, &slot[k], 0);
            global_norm_finish(out, partial, 2 * GLOBAL_NORM_PIECE_BLOCKS, 0);
            y.push_back(out[0]);
        }
        global_norm(out, whole_partial, g, n, 0);
        y.push_back(out[0]);
    } else if (op == ADAMW) {
        size_t n = (size_t)d[0];
        std::vector<float> hp = read_floats(f, 8, argv[1]);
        float *arrays[4];
        for (int k = 0; k < 4; k++) {   // params, grads, m, v
            std::vector<float> x = read_floats(f, n, argv[1]);
            arrays[k] = (float *)device_alloc((n + offset) * sizeof(float), 0xff) + offset;
            memcpy(arrays[k], x.data(), n * sizeof(float));
        }
        floatX *copy = bf16_buffer(n, 0, NULL);
        auto run = kernel == 0 ? adamw_update_scalar : kernel == 1 ? adamw_update_vec4 : adamw_update;
        run(arrays[0], copy, arrays[1], arrays[2], arrays[3], n, hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7], 0);
        for (int k : {0, 2, 3}) y.insert(y.end(), arrays[k], arrays[k] + n);
        for (size_t i = 0; i < n; i++) y.push_back(to_f32(copy[i]));
    } else if (op == SWIGLU_ROWNORM) {
        int N = d[0], F = d[1], C = d[2];
        std::vector<float> fc_host = read_floats(f, 2 * (size_t)N * F, argv[1]), x_host = read_floats(f, (size_t)N * C, argv[1]);
        floatX *fc = bf16_buffer(fc_host.size(), offset, &fc_host), *x = bf16_buffer(x_host.size(), offset, &x_host);
        floatX *out = bf16_buffer((size_t)N * F, offset, NULL);
        swiglu_forward_rownorm(out, fc, x, N, F, C, 1e-5f, 0);
        y.resize((size_t)N * F);
        for (size_t i = 0; i < y.size(); i++) y[i] = to_f32(out[i]);
    } else if (op == SWIGLU_FORWARD || op == SWIGLU_BACKWARD) {
        int N = d[0], F = d[1];
        size_t n = (size_t)N * F;
        std::vector<float> fc_host = read_floats(f, 2 * n, argv[1]);
        floatX *fc = bf16_buffer(2 * n, offset, &fc_host), *out;
        if (op == SWIGLU_FORWARD) {
            out = bf16_buffer(n, offset, NULL);
            auto run = kernel == 0 ? swiglu_forward_scalar : kernel == 1 ? swiglu_forward_vec8 : swiglu_forward;
            run(out, fc, N, F, 0);
            y.resize(n);
        } else {
            std::vector<float> dout_host = read_floats(f, n, argv[1]);
            floatX *dout = bf16_buffer(n, offset, &dout_host);
            out = bf16_buffer(2 * n, offset, NULL);
            auto run = kernel == 0 ? swiglu_backward_scalar : kernel == 1 ? swiglu_backward_vec8 : swiglu_backward;
            run(out, dout, fc, N, F, 0);
            y.resize(2 * n);
        }
        for (size_t i = 0; i < y.size(); i++) y[i] = to_f32(out[i]);
    } else if (op == ROPE_FORWARD || op == ROPE_BACKWARD || op == ROPE_FORWARD_KEYS) {
        int B = d[0], T = d[1], NH = d[2], NKV = d[3], HS = d[4];
        float theta = read_floats(f, 1, argv[1])[0];
        size_t n = (size_t)B * T * (NH + 2 * NKV) * HS;
        std::vector<float> qkv_host = read_floats(f, n, argv[1]);
        floatX *qkv = bf16_buffer(n, offset, &qkv_host);
        float *table_host = rope_table_host(T, HS, theta);
        float *cos_sin = (float *)device_alloc((size_t)T * HS * sizeof(float), 0);
        memcpy(cos_sin, table_host, (size_t)T * HS * sizeof(float));
        free(table_host);
        float sign = op == ROPE_BACKWARD ? -1.0f : 1.0f;
        if (op == ROPE_FORWARD_KEYS) {
            if (kernel == 0) rope_scalar_heads(qkv, cos_sin, B, T, NH, NKV, HS, NH, sign, 0);
            else if (kernel == 1) rope_vec8_heads(qkv, cos_sin, B, T, NH, NKV, HS, NH, sign, 0);
            else rope_forward_keys(qkv, cos_sin, B, T, NH, NKV, HS, 0);
        } else if (kernel == 0) rope_scalar(qkv, cos_sin, B, T, NH, NKV, HS, sign, 0);
        else if (kernel == 1) rope_vec8(qkv, cos_sin, B, T, NH, NKV, HS, sign, 0);
        else if (op == ROPE_FORWARD) rope_forward(qkv, cos_sin, B, T, NH, NKV, HS, 0);
        else rope_backward(qkv, cos_sin, B, T, NH, NKV, HS, 0);
        y.resize(n);
        for (size_t i = 0; i < n; i++) y[i] = to_f32(qkv[i]);
    } else {
        size_t n = (size_t)d[0];
        std::vector<float> inp_host = read_floats(f, n, argv[1]);
        floatX *inp = bf16_buffer(n, offset, &inp_host), *out;
        if (op == GELU_FORWARD) {
            out = bf16_buffer(n, offset, NULL);
            auto run = kernel == 0 ? gelu_forward_scalar : kernel == 1 ? gelu_forward_vec8 : gelu_forward;
            run(out, inp, n, 0);
        } else {
            std::vector<float> dout_host = read_floats(f, n, argv[1]);
            floatX *dout = bf16_buffer(n, offset, &dout_host);
            out = d[1] ? dout : bf16_buffer(n, offset, NULL);
            auto run = kernel == 0 ? gelu_backward_scalar : kernel == 1 ? gelu_backward_vec8 : gelu_backward;
            run(out, inp, dout, n, 0);
        }
        y.resize(n);
        for (size_t i = 0; i < n; i++) y[i] = to_f32(out[i]);
    }
    fclose(f);

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    bool ok = fwrite(y.data(), sizeof(float), y.size(), o) == y.size();
    if (fclose(o) != 0 || !ok) {
        fprintf(stderr, "error: cannot write %s\n", argv[2]);
        return 1;
    }
    printf("threads %zu\n", launched_threads);
    printf("elementwise_emu op %d kernel %d misalign %d, threads %s: done\n", op, kernel, offset, argv[3]);
    return 0;
}
