/*
 * Runs the simple attention kernels of llmc/attention.cuh (forward, and the backward's
 * preprocess, dq and dk/dv passes) and the embedding kernels of llmc/encoder.cuh (forward, and
 * the backward into wte and wpe) on the CPU through their host entry points, beside the CPU ops
 * they are the twins of (llmc/ops_cpu.c: attention_forward / attention_backward,
 * encoder_forward / encoder_backward, with real = float) on the same inputs, so that
 * test/test_attention_emu.py can compare the two on a machine without a GPU.
 *
 * The kernels' source is compiled as C++ under the GPU emulation of test/gpu_emu.h with the
 * runtime of test/gpu_emu_runtime.h; the test's build concatenates the two headers with each
 * launch rewritten into an emu_launch call (test/gpu_emu.py). Device outputs start as NaN (all
 * bytes 0xff), and so do the kernels' static __shared__ tiles before every block
 * (attention_emu.ld), so an element nothing wrote shows up. The blocks run in EMU_BLOCKS's order
 * (test/gpu_emu.h).
 *
 *   attention_emu IN OUT forward|reverse   (the order of the threads in a block)
 *     IN : int32 op, then
 *          op 0 attention: int32 B, T, NH, NKV, HS; float32 qkv (B, T, (NH + 2 NKV) HS), dout
 *               (B, T, NH HS), both representable in bf16
 *          op 1 embedding: int32 B, T, C, V, maxT, has_wpe, bf16_stream (the residual stream's
 *               type TR: 0 fp32, 1 bf16), tokens (B, T); float32 wte (V, C) and wpe (maxT, C)
 *               when has_wpe (representable in bf16), dout (B, T, C) (in bf16 with bf16_stream),
 *               the gradients' starting values dwte (V, C) and dwpe (maxT, C) when has_wpe
 *     OUT: float32, the kernels' results then the CPU ops':
 *          op 0: out (B, T, NH HS), lse (B, NH, T), dqkv (B, T, QKV); out, att (B, NH, T, T),
 *                dqkv (the CPU's from zero)
 *          op 1: out (B, T, C), dwte, dwpe (when has_wpe); the same from the CPU
 */
#define EMU_PROGRAM "attention_emu"
#define EMU_STATIC_SHARED
#include "gpu_emu_runtime.h"

// the blocks run one at a time on one OS thread: a plain read-modify-write is atomic
static inline float atomicAdd(float *address, float value) {
    float old = *address;
    *address = old + value;
    return old;
}
#include "attention_launched.cuh"   // llmc/attention.cuh and encoder.cuh, launches rewritten
#include "emu_io.h"
extern "C" {
#include "ops_cpu.h"
}

static float *device_f32(const std::vector<float> &x) {
    float *p = (float *)device_alloc(x.size() * sizeof(float), 0xff);
    memcpy(p, x.data(), x.size() * sizeof(float));
    return p;
}
template <typename T> static void append(std::vector<float> &y, const T *x, size_t n) {
    for (size_t i = 0; i < n; i++) y.push_back(to_float(x[i]));
}

static void run_attention(FILE *f, const char *path, std::vector<float> &y) {
    std::vector<int32_t> h = read_n<int32_t>(f, 5, path);
    const int B = h[0], T = h[1], NH = h[2], NKV = h[3], HS = h[4];
    if (B < 1 || T < 1 || NH < 1 || NKV < 1 || NH % NKV != 0 || HS < 1) {
        fprintf(stderr, "error: %s: bad attention shape\n", path);
        exit(1);
    }
    const size_t QKV = (size_t)(NH + 2 * NKV) * HS, n_qkv = (size_t)B * T * QKV, n_out = (size_t)B * T * NH * HS;
    const size_t n_stat = (size_t)B * NH * T;
    std::vector<float> qkv = read_n<float>(f, n_qkv, path), dout = read_n<float>(f, n_out, path);

    floatX *d_qkv = device_bf16(qkv), *d_dout = device_bf16(dout);
    floatX *d_out = (floatX *)device_alloc(n_out * 2, 0xff), *d_dqkv = (floatX *)device_alloc(n_qkv * 2, 0xff);
    float *d_lse = (float *)device_alloc(n_stat * 4, 0xff), *d_D = (float *)device_alloc(n_stat * 4, 0xff);
    attention_forward(d_out, d_lse, d_qkv, B, T, NH, NKV, HS, 0);
    attention_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, NH, NKV, HS, 0);
    append(y, d_out, n_out);
    append(y, d_lse, n_stat);
    append(y, d_dqkv, n_qkv);

    std::vector<float> out(n_out), att(n_stat * T), datt(n_stat * T), dqkv(n_qkv, 0.0f);
    ::attention_forward(out.data(), att.data(), qkv.data(), B, T, NH, NKV, HS);
    ::attention_backward(dqkv.data(), datt.data(), dout.data(), qkv.data(), att.data(), B, T, NH, NKV, HS);
    append(y, out.data(), n_out);
    append(y, att.data(), att.size());
    append(y, dqkv.data(), n_qkv);
}

template <typename TR>
static void run_encoder_gpu(std::vector<float> &y, const std::vector<int32_t> &tokens, const std::vector<float> &wte,
                            const std::vector<float> *wpe, const std::vector<float> &dout, const std::vector<float> &dwte0,
                            const std::vector<float> *dwpe0, int B, int T, int C) {
    const size_t n = (size_t)B * T * C;
    int *d_tokens = (int *)device_alloc(tokens.size() * 4, 0xff);
    memcpy(d_tokens, tokens.data(), tokens.size() * 4);
    floatX *d_wte = device_bf16(wte), *d_wpe = wpe ? device_bf16(*wpe) : NULL;
    TR *d_out = (TR *)device_alloc(n * sizeof(TR), 0xff), *d_dout = (TR *)device_alloc(n * sizeof(TR), 0xff);
    for (size_t i = 0; i < n; i++) d_dout[i] = from_float<TR>(dout[i]);
    float *d_dwte = device_f32(dwte0), *d_dwpe = dwpe0 ? device_f32(*dwpe0) : NULL;
    encoder_forward<TR>(d_out, d_tokens, d_wte, d_wpe, B, T, C, 0);
    encoder_backward<TR>(d_dwte, d_dwpe, d_dout, d_tokens, B, T, C, 0);
    append(y, d_out, n);
    append(y, d_dwte, dwte0.size());
    if (dwpe0) append(y, d_dwpe, dwpe0->size());
}

static void run_encoder(FILE *f, const char *path, std::vector<float> &y) {
    std::vector<int32_t> h = read_n<int32_t>(f, 7, path);
    const int B = h[0], T = h[1], C = h[2], V = h[3], maxT = h[4], has_wpe = h[5], bf16_stream = h[6];
    if (B < 1 || T < 1 || C < 1 || V < 1 || maxT < T) {
        fprintf(stderr, "error: %s: bad embedding shape\n", path);
        exit(1);
    }
    const size_t n = (size_t)B * T * C;
    std::vector<int32_t> tokens = read_n<int32_t>(f, (size_t)B * T, path);
    for (int32_t t : tokens)
        if (t < 0 || t >= V) { fprintf(stderr, "error: %s: token out of range\n", path); exit(1); }
    std::vector<float> wte = read_n<float>(f, (size_t)V * C, path), wpe;
    if (has_wpe) wpe = read_n<float>(f, (size_t)maxT * C, path);
    std::vector<float> dout = read_n<float>(f, n, path), dwte0 = read_n<float>(f, (size_t)V * C, path), dwpe0;
    if (has_wpe) dwpe0 = read_n<float>(f, (size_t)maxT * C, path);

    if (bf16_stream) run_encoder_gpu<floatX>(y, tokens, wte, has_wpe ? &wpe : NULL, dout, dwte0, has_wpe ? &dwpe0 : NULL, B, T, C);
    else run_encoder_gpu<float>(y, tokens, wte, has_wpe ? &wpe : NULL, dout, dwte0, has_wpe ? &dwpe0 : NULL, B, T, C);

    std::vector<float> out(n), dwte = dwte0, dwpe = dwpe0;
    ::encoder_forward(out.data(), tokens.data(), wte.data(), has_wpe ? wpe.data() : NULL, B, T, C);
    ::encoder_backward(dwte.data(), has_wpe ? dwpe.data() : NULL, dout.data(), tokens.data(), B, T, C);
    append(y, out.data(), n);
    append(y, dwte.data(), dwte.size());
    if (has_wpe) append(y, dwpe.data(), dwpe.size());
}

int main(int argc, char **argv) {
    FILE *f = emu_open_input(argc, argv, 2 * 32 * 16 * sizeof(float));   // the smallest tiles (ATT_TILE rows, HS 16)
    int32_t op = read_n<int32_t>(f, 1, argv[1])[0];
    std::vector<float> y;
    if (op == 0) run_attention(f, argv[1], y);
    else if (op == 1) run_encoder(f, argv[1], y);
    else { fprintf(stderr, "error: %s: bad op %d\n", argv[1], op); return 1; }
    fclose(f);
    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    bool ok = fwrite(y.data(), sizeof(float), y.size(), o) == y.size();
    if (fclose(o) != 0 || !ok) { fprintf(stderr, "error: cannot write %s\n", argv[2]); return 1; }
    printf("attention_emu op %d, threads %s: done\n", op, argv[3]);
    return 0;
}
