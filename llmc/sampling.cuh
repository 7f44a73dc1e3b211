/*
 * Token sampling on the GPU, fused: one block per row of logits picks the next token (greedy,
 * or temperature + top-k + top-p + a random draw) and its log-probability, without sorting the
 * vocabulary and without leaving the GPU. CPU counterpart: sample_token in generate.c (same
 * candidate set; the random draws differ: the CPU uses xorshift, the GPU Philox).
 *
 * Shapes: logits (n_rows, Vp) fp32, V <= Vp tokens used. Per row: row_key (the sequence's
 * 64-bit Philox key), row_step (how many tokens the sequence has generated: the Philox counter).
 * Outputs: out_token (n_rows), out_logprob (n_rows) = log p(token) at temperature 1 over all V
 * tokens (untruncated), as generate.h defines it.
 *
 * The candidate set. Tokens are ordered by a 64-bit key: the logit's bits made order-preserving
 * (high 32 bits), then the complement of the token id (low 32 bits), so that a larger key means
 * a larger logit and, between equal logits, the smaller id: the CPU's sort order (probability
 * descending, id ascending). Keys are unique, and every candidate set is a prefix of this order,
 * described by a threshold: (prefix, depth) keeps the keys whose top `depth` bits are >= prefix.
 *   top-k: the prefix of length k.
 *   top-p: inside the top-k prefix, the shortest prefix whose probability mass at the
 *          temperature reaches top_p times the mass of the top-k prefix; a token is in it iff
 *          the mass before it (of the tokens with larger keys) is < ceil(top_p * total).
 * Both thresholds are found by a radix descent over the keys, 8 bits a level from the top: a
 * histogram of the next digit among the keys that match the prefix so far (counts for top-k,
 * counts and masses for top-p), then the digit where the running count or mass reaches its
 * target; it stops as soon as the chosen bucket is known to end the prefix (at most 8 levels,
 * usually 2 to 4). Masses are fixed point, p * 2^40 in 64-bit integers (p = exp((x - max) / T)
 * <= 1), so every sum is exact and the set does not depend on the order of the atomic adds: the
 * same logits give the same set on every run. Tokens with p < 2^-40 weigh 0 in top-p's mass.
 *
 * The draw. Inside the set the token is argmax_v (x_v / T + G_v), G_v = -log(-log(u_v)) a Gumbel
 * variate: this is an exact draw from the softmax at temperature T restricted to the set (the
 * Gumbel-max trick; softmax(x / T) does not change when the row's max is taken off x, nor does
 * the argmax, so the scores need no max and a block can score its tokens without the row's), and
 * it is one parallel argmax instead of a prefix sum. u_v is
 * philox(key, counter (v / 4, step, domain, 0)) lane v % 4 (philox.h): a function of the
 * sequence, the step and the token only.
 *
 * The split path. One block per row leaves most SMs idle when the rows are fewer than the SMs
 * (64 rows on 132 SMs), and greedy or plain temperature sampling (no top-k, no top-p: the common
 * case) needs no set, only the max, the log-sum-exp and one argmax, which divide over blocks. With
 * a SampleSplitScratch the host entry point cuts each row into S contiguous ranges of token
 * groups (sample_split_blocks: S blocks of SAMPLE_SPLIT_THREADS per row, as many as fill
 * SAMPLE_SPLIT_BLOCKS_PER_SM blocks per SM) and launches two kernels in stream order:
 *   1. sample_rows_split_kernel: block (r, s) reads its range once and writes its (max, sum of
 *      exp(x - its max), argmax, non-finite flag) and, for temperature > 0, its best (Gumbel score,
 *      token), each score computed as the one-block kernel computes it;
 *   2. sample_rows_kernel: merges the S partials of its row (the statistics and the bests, over the
 *      S lanes of one warp, in a fixed order), writes the token and log-probability and advances
 *      the row, as for its own result.
 * Every score is the one-block kernel's, and the best of a set by (larger score, then smaller id)
 * does not depend on how the set is cut, so the token is the one-block kernel's; the
 * log-probability differs only by the order of the fp32 sums of the log-sum-exp. Nothing depends
 * on the order in which blocks run (no float atomics), and nothing is carried from one call to
 * the next (no counters), so the scratch needs no initialisation and a CUDA graph replays as is.
 *
 * The choice of path. The config lives in device memory and a captured graph replays with the
 * values of each call, so the path is chosen on the device, by sample_split_config, from the
 * same values in both kernels: the split kernel returns at once when top-k or top-p is on,
 * and sample_rows_kernel then does everything itself as without scratch. The final merge belongs
 * in sample_rows_kernel because that launch is needed anyway for the top-k/top-p case: the split
 * path costs two launches, as a split path that finishes in its last block (with a counter)
 * followed by an idle one-block launch would, and the top-k/top-p path pays one launch that
 * returns at once.
 *
 * sample_rows_reference_kernel is the plain version of the same definition for the harnesses:
 * serial loops, the set by counting for every token how many keys are larger (O(V^2) per row
 * when top-k or top-p is on: small vocabularies only). Its tokens equal the fast kernel's.
 */
#ifndef LLMC_SAMPLING_CUH
#define LLMC_SAMPLING_CUH
#include <limits.h>
#include <math.h>
#include <string.h>
#include "cuda_common.h"
#include "philox.h"

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define SAMPLE_BUCKETS 256
#define SAMPLE_MASS_ONE 1099511627776.0f   // 2^40: fixed-point scale of the top-p masses
// the split path: blocks of SAMPLE_SPLIT_THREADS, at most SAMPLE_SPLIT_MAX_BLOCKS per row (one warp
// merges their partials), sized for SAMPLE_SPLIT_BLOCKS_PER_SM resident blocks per SM
#define SAMPLE_SPLIT_THREADS 256
#define SAMPLE_SPLIT_WARPS (SAMPLE_SPLIT_THREADS / 32)
#define SAMPLE_SPLIT_MAX_BLOCKS 32
#define SAMPLE_SPLIT_BLOCKS_PER_SM 4
// bits of the error word the sampler sets (the engine reports them on the host)
#define SAMPLE_ERR_NONFINITE_LOGITS 1
#define SAMPLE_ERR_REFERENCE_VOCAB 4   // the reference kernel's top-p was given V > 64 * 256

// What the sampler does; lives in device memory so that a captured CUDA graph reads the values
// of the current call.
typedef struct {
    float temperature;   // 0: greedy
    int top_k;           // 0 or >= V: no top-k
    float top_p;         // 1: no top-p
    int unused;
} SampleConfig;

// Whether the config asks for greedy or plain temperature sampling, the split path's cases: the
// negation of the one-block kernel's conditions for a top-k or top-p set.
__host__ __device__ __forceinline__ bool sample_split_config(float temperature, int top_k, float top_p, int V) {
    bool sampling = temperature > 0.0f;
    bool top_k_on = top_k > 0 && top_k < V;
    bool top_p_on = top_p < 1.0f;
    return !sampling || (!top_k_on && !top_p_on);
}

// Order-preserving bits of a float: a < b as floats iff the results compare the same way.
__host__ __device__ __forceinline__ uint32_t sample_order_bits(float x) {
#ifdef __CUDA_ARCH__
    uint32_t b = __float_as_uint(x);
#else
    uint32_t b;
    memcpy(&b, &x, sizeof(b));
#endif
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// The token order key: larger logit first, then smaller id.
__host__ __device__ __forceinline__ uint64_t sample_key(float logit, int v) {
    return ((uint64_t)sample_order_bits(logit) << 32) | (uint64_t)(0xFFFFFFFFu - (uint32_t)v);
}
// Keys whose top `depth` bits are >= prefix (depth 0: every key).
__host__ __device__ __forceinline__ bool sample_key_kept(uint64_t key, uint64_t prefix, int depth) {
    return depth == 0 || (key >> (64 - depth)) >= prefix;
}
// Fixed-point probability mass at the temperature: p * 2^40, p = exp((x - max) * inv_t) <= 1.
__host__ __device__ __forceinline__ unsigned long long sample_mass(float x, float max_logit, float inv_t) {
    float p = expf((x - max_logit) * inv_t);
    return (unsigned long long)(p * SAMPLE_MASS_ONE);
}

// The perturbed score x / T + G of the Gumbel-max draw. Rounded operations (no fused
// multiply-add) so the fast and the reference kernel compute the same bits.
__device__ __forceinline__ float sample_gumbel_score(float x, float inv_t, uint32_t bits) {
    float u = philox_uniform_open(bits);
    float gumbel = -logf(-logf(u));
    return __fadd_rn(__fmul_rn(x, inv_t), gumbel);
}

// ---------------------------------------------------------------------------------------------
// block reductions

// Running (max, sum of exp(x - max), argmax with the smallest index on ties).
struct SampleMaxSum { float m, s; int idx; };
// Adds logit xv of token v to a running (max, sum of exp(x - max), argmax): the first of equal
// maxima keeps the argmax (tokens arrive in increasing order per thread).
__device__ __forceinline__ void sample_max_sum_add(SampleMaxSum &ms, float xv, int v) {
    if (xv > ms.m) { ms.s = ms.s * expf(ms.m - xv) + 1.0f; ms.m = xv; ms.idx = v; }
    else ms.s += expf(xv - ms.m);
}
__device__ __forceinline__ SampleMaxSum sample_max_sum_combine(SampleMaxSum a, SampleMaxSum b) {
    if (b.m == -INFINITY) return a;   // b saw no element
    if (a.m == -INFINITY) return b;
    SampleMaxSum r;
    r.m = fmaxf(a.m, b.m);
    r.s = a.s * expf(a.m - r.m) + b.s * expf(b.m - r.m);
    r.idx = (a.m > b.m || (a.m == b.m && a.idx < b.idx)) ? a.idx : b.idx;
    return r;
}
// The whole warp's combination; every lane gets it (the combination is commutative, so the
// butterfly gives every lane the same bits).
__device__ __forceinline__ SampleMaxSum sample_warp_max_sum(SampleMaxSum v) {
    for (int off = 16; off > 0; off >>= 1) {
        SampleMaxSum o;
        o.m = __shfl_xor_sync(0xffffffffu, v.m, off);
        o.s = __shfl_xor_sync(0xffffffffu, v.s, off);
        o.idx = __shfl_xor_sync(0xffffffffu, v.idx, off);
        v = sample_max_sum_combine(v, o);
    }
    return v;
}
// Whole block of WARPS warps; every thread gets the result. shared holds WARPS entries.
template <int WARPS>
__device__ __forceinline__ SampleMaxSum sample_block_max_sum(SampleMaxSum v, SampleMaxSum *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = sample_warp_max_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        SampleMaxSum none = {-INFINITY, 0.0f, INT_MAX};
        v = lane < WARPS ? shared[lane] : none;
        v = sample_warp_max_sum(v);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    SampleMaxSum r = shared[0];
    __syncthreads();   // shared may be reused at once
    return r;
}

// Best (score, index): larger score, then smaller index.
struct SampleBest { float score; int idx; };
__device__ __forceinline__ SampleBest sample_best_combine(SampleBest a, SampleBest b) {
    return (b.score > a.score || (b.score == a.score && b.idx < a.idx)) ? b : a;
}
__device__ __forceinline__ SampleBest sample_warp_best(SampleBest v) {
    for (int off = 16; off > 0; off >>= 1) {
        SampleBest o;
        o.score = __shfl_xor_sync(0xffffffffu, v.score, off);
        o.idx = __shfl_xor_sync(0xffffffffu, v.idx, off);
        v = sample_best_combine(v, o);
    }
    return v;
}
template <int WARPS>
__device__ __forceinline__ SampleBest sample_block_best(SampleBest v, SampleBest *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = sample_warp_best(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        SampleBest none = {-INFINITY, INT_MAX};
        v = lane < WARPS ? shared[lane] : none;
        v = sample_warp_best(v);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    SampleBest r = shared[0];
    __syncthreads();
    return r;
}

// A split block's partial statistics of its range: the SampleMaxSum and whether it holds a NaN or
// an infinity (then the other fields are meaningless).
struct __align__(16) SampleSplitStats { float m, s; int idx, bad; };

// ---------------------------------------------------------------------------------------------
// radix descent

// Called by warp 0 only. Buckets are visited from 255 down (larger keys first); lane l owns
// buckets 255 - 8l .. 255 - 8l - 7. Returns (to every lane) the first bucket at which the running
// sum of hist reaches need, and in *above the sum of the buckets before it.
template <typename T>
__device__ __forceinline__ int sample_pick_bucket(const T *hist, T need, T *above) {
    int lane = threadIdx.x % 32;
    T local = 0;
    #pragma unroll
    for (int j = 0; j < 8; j++) local += hist[255 - 8 * lane - j];
    T incl = local;
    #pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        T y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
    }
    unsigned ballot = __ballot_sync(0xffffffffu, incl >= need);
    // the sums are exact integers and need <= the total, so some lane reaches it; the fallback
    // (the last lane and its last bucket) only guards against a caller's mistake
    int owner = ballot ? __ffs(ballot) - 1 : 31;
    int bucket = 255 - 8 * owner - 7;
    T acc = incl - local;
    if (lane == owner) {
        for (int j = 0; j < 8; j++) {
            int b = 255 - 8 * lane - j;
            if (acc + hist[b] >= need) { bucket = b; break; }
            acc += hist[b];
        }
    }
    bucket = __shfl_sync(0xffffffffu, bucket, owner);
    *above = __shfl_sync(0xffffffffu, acc, owner);
    return bucket;
}

// Shared memory of the fast kernel beyond its static part: per-warp histograms (private to a
// warp, so the atomics of 32 warps do not contend on one array).
#define SAMPLE_DYNAMIC_SMEM (SAMPLE_WARPS * SAMPLE_BUCKETS * (sizeof(unsigned) + sizeof(unsigned long long)))

// One level of the descent for the whole block: histograms (counts; masses when with_mass) of
// the digit below `depth` bits of the keys that are kept by (limit_prefix, limit_depth) and
// whose top `depth` bits equal prefix. Results in cnt / mass (SAMPLE_BUCKETS each).
__device__ __forceinline__ void sample_histogram(unsigned *cnt, unsigned long long *mass, unsigned *warp_cnt,
                                                 unsigned long long *warp_mass, const float *x, int V,
                                                 uint64_t prefix, int depth, uint64_t limit_prefix, int limit_depth,
                                                 bool with_mass, float max_logit, float inv_t) {
    int warp = threadIdx.x / 32;
    for (int i = threadIdx.x; i < SAMPLE_WARPS * SAMPLE_BUCKETS; i += blockDim.x) {
        warp_cnt[i] = 0;
        warp_mass[i] = 0;
    }
    __syncthreads();
    unsigned *my_cnt = warp_cnt + warp * SAMPLE_BUCKETS;
    unsigned long long *my_mass = warp_mass + warp * SAMPLE_BUCKETS;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float xv = x[v];
        uint64_t key = sample_key(xv, v);
        if (!sample_key_kept(key, limit_prefix, limit_depth)) continue;
        if (depth > 0 && (key >> (64 - depth)) != prefix) continue;
        int digit = (int)((key >> (56 - depth)) & 0xFF);
        atomicAdd(&my_cnt[digit], 1u);
        if (with_mass) atomicAdd(&my_mass[digit], sample_mass(xv, max_logit, inv_t));
    }
    __syncthreads();
    for (int b = threadIdx.x; b < SAMPLE_BUCKETS; b += blockDim.x) {
        unsigned c = 0;
        unsigned long long m = 0;
        for (int w = 0; w < SAMPLE_WARPS; w++) { c += warp_cnt[w * SAMPLE_BUCKETS + b]; m += warp_mass[w * SAMPLE_BUCKETS + b]; }
        cnt[b] = c;
        mass[b] = m;
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// the fast kernel

// Row r's result, written by one thread: the token, its log-probability, and the row's decode state
// when row_token is not NULL and the row's slot is not dummy_slot (the padding rows').
__device__ __forceinline__ void sample_finish_row(int r, int chosen, float logprob, int *out_token, float *out_logprob,
                                                  int *row_step, int *row_token, int *row_pos, const int *row_slot,
                                                  int dummy_slot) {
    out_token[r] = chosen;
    out_logprob[r] = logprob;
    if (row_token != NULL && row_slot[r] != dummy_slot) {
        row_token[r] = chosen;
        row_pos[r] += 1;
        row_step[r] += 1;
    }
}
// A row with a NaN or an infinite logit: flagged, token 0, log-probability NaN, state unchanged.
__device__ __forceinline__ void sample_flag_row(int r, int *out_token, float *out_logprob, int *err) {
    atomicOr(err, SAMPLE_ERR_NONFINITE_LOGITS);
    out_token[r] = 0;
    out_logprob[r] = NAN;
}

// grid (n_rows), block SAMPLE_THREADS, dynamic shared SAMPLE_DYNAMIC_SMEM bytes.
// When row_token is not NULL the decode state of every row whose slot is not dummy_slot
// advances: row_token = the sampled token, row_pos += 1, row_step += 1.
// With split_blocks > 0 and a config of the split path (sample_split_config), the row's result is
// the merge of the split kernel's partials: split_stats and split_best, split_blocks per row.
__global__ void __launch_bounds__(SAMPLE_THREADS, 1)
sample_rows_kernel(int *out_token, float *out_logprob, const float *logits, int V, int Vp, const SampleConfig *cfg,
                   const uint64_t *row_key, int *row_step, int *row_token, int *row_pos, const int *row_slot,
                   int dummy_slot, int *err, const SampleSplitStats *split_stats, const SampleBest *split_best,
                   int split_blocks) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    unsigned char *sample_smem = dynamic_smem();
    unsigned long long *warp_mass = (unsigned long long *)sample_smem;
    unsigned *warp_cnt = (unsigned *)(warp_mass + SAMPLE_WARPS * SAMPLE_BUCKETS);
    __shared__ unsigned cnt[SAMPLE_BUCKETS];
    __shared__ unsigned long long mass[SAMPLE_BUCKETS];
    __shared__ SampleMaxSum red_ms[SAMPLE_WARPS];
    __shared__ SampleBest red_best[SAMPLE_WARPS];
    __shared__ int s_bucket, s_done;
    __shared__ unsigned long long s_need;
    __shared__ int s_bad;

    int r = blockIdx.x;
    const float *x = logits + (size_t)r * Vp;
    const float temperature = cfg->temperature;
    const int top_k = cfg->top_k;
    const float top_p = cfg->top_p;
    const uint64_t key = row_key[r];
    const int step = row_step[r];

    if (split_blocks > 0 && sample_split_config(temperature, top_k, top_p, V)) {
        // the split path's last step: lane s of warp 0 holds partial s; the merges go over the
        // warp in a fixed order, so the result does not depend on which block finished when
        if (threadIdx.x >= 32) return;   // no block barrier follows
        int lane = threadIdx.x;
        SampleSplitStats p = {-INFINITY, 0.0f, INT_MAX, 0};
        if (lane < split_blocks) p = split_stats[(size_t)r * split_blocks + lane];
        bool row_bad = __ballot_sync(0xffffffffu, p.bad) != 0u;
        SampleMaxSum ms = {p.m, p.s, p.idx};
        ms = sample_warp_max_sum(ms);
        if (row_bad) {
            if (lane == 0) sample_flag_row(r, out_token, out_logprob, err);
            return;
        }
        int chosen = ms.idx;
        if (temperature > 0.0f) {
            SampleBest b = {-INFINITY, INT_MAX};
            if (lane < split_blocks) b = split_best[(size_t)r * split_blocks + lane];
            chosen = sample_warp_best(b).idx;
        }
        if (lane == 0)
            sample_finish_row(r, chosen, x[chosen] - (ms.m + logf(ms.s)), out_token, out_logprob, row_step, row_token,
                              row_pos, row_slot, dummy_slot);
        return;
    }

    if (threadIdx.x == 0) s_bad = 0;
    __syncthreads();

    // pass 1: max, argmax, sum of exp(x - max) (log-sum-exp at temperature 1)
    SampleMaxSum ms = {-INFINITY, 0.0f, INT_MAX};
    bool bad = false;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float xv = x[v];
        if (!isfinite(xv)) { bad = true; continue; }
        sample_max_sum_add(ms, xv, v);
    }
    if (bad) s_bad = 1;
    ms = sample_block_max_sum<SAMPLE_WARPS>(ms, red_ms);   // its barriers publish s_bad
    if (s_bad) {
        if (threadIdx.x == 0) sample_flag_row(r, out_token, out_logprob, err);
        return;   // block-uniform: s_bad is read after a barrier
    }
    const float max_logit = ms.m, lse = ms.m + logf(ms.s);
    int chosen = ms.idx;

    if (temperature > 0.0f) {
        const float inv_t = 1.0f / temperature;
        uint64_t limit_prefix = 0;
        int limit_depth = 0;
        if (top_k > 0 && top_k < V) {
            // the k-th largest key: descend by counts
            uint64_t prefix = 0;
            int depth = 0;
            unsigned need = (unsigned)top_k;
            for (int level = 0; level < 8; level++) {
                sample_histogram(cnt, mass, warp_cnt, warp_mass, x, V, prefix, depth, 0, 0, false, max_logit, inv_t);
                if (threadIdx.x < 32) {
                    unsigned above;
                    int b = sample_pick_bucket<unsigned>(cnt, need, &above);
                    if (threadIdx.x == 0) {
                        s_bucket = b;
                        s_done = above + cnt[b] == need;   // the whole bucket ends the prefix
                        s_need = need - above;
                    }
                }
                __syncthreads();
                prefix = (prefix << 8) | (uint64_t)s_bucket;
                depth += 8;
                need = (unsigned)s_need;
                int done = s_done;
                __syncthreads();
                if (done) break;
            }
            limit_prefix = prefix;
            limit_depth = depth;
        }
        if (top_p < 1.0f) {
            // the shortest prefix (inside the top-k one) reaching ceil(top_p * its mass)
            uint64_t prefix = 0;
            int depth = 0;
            unsigned long long need = 0;
            for (int level = 0; level < 8; level++) {
                sample_histogram(cnt, mass, warp_cnt, warp_mass, x, V, prefix, depth, limit_prefix, limit_depth, true,
                                 max_logit, inv_t);
                if (threadIdx.x < 32) {
                    if (level == 0) {
                        unsigned long long total = 0;
                        for (int b = 0; b < SAMPLE_BUCKETS; b++) total += mass[b];
                        need = (unsigned long long)ceil((double)top_p * (double)total);
                        if (need < 1ull) need = 1ull;
                        if (need > total) need = total;
                    } else {
                        need = s_need;
                    }
                    unsigned long long above;
                    int b = sample_pick_bucket<unsigned long long>(mass, need, &above);
                    if (threadIdx.x == 0) {
                        s_bucket = b;
                        s_done = cnt[b] == 1u;   // the crossing token is alone in its bucket
                        s_need = need - above;
                    }
                }
                __syncthreads();
                prefix = (prefix << 8) | (uint64_t)s_bucket;
                depth += 8;
                int done = s_done;
                __syncthreads();
                if (done) break;
            }
            // the top-p prefix lies inside the top-k prefix, so it replaces it
            limit_prefix = prefix;
            limit_depth = depth;
        }
        // Gumbel-max over the set; thread t owns groups of 4 consecutive tokens (one Philox call)
        SampleBest best = {-INFINITY, INT_MAX};
        for (int g = threadIdx.x; 4 * g < V; g += blockDim.x) {
            Philox4x32 bits = philox_sampling_block(key, (uint32_t)g, (uint32_t)step);
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                int v = 4 * g + e;
                if (v >= V) break;
                float xv = x[v];
                if (!sample_key_kept(sample_key(xv, v), limit_prefix, limit_depth)) continue;
                SampleBest cand = {sample_gumbel_score(xv, inv_t, bits.v[e]), v};
                best = sample_best_combine(best, cand);
            }
        }
        best = sample_block_best<SAMPLE_WARPS>(best, red_best);
        chosen = best.idx;
    }
    if (threadIdx.x == 0)
        sample_finish_row(r, chosen, x[chosen] - lse, out_token, out_logprob, row_step, row_token, row_pos, row_slot,
                          dummy_slot);
}

// ---------------------------------------------------------------------------------------------
// the split path (greedy and plain temperature sampling)

// Row part `part` of `parts` owns the token groups [*g0, *g1) of the row's ceil(V / 4) groups
// of 4 (the draw's Philox groups): contiguous ranges whose sizes differ by at most one.
__device__ __forceinline__ void sample_split_range(int part, int parts, int V, int *g0, int *g1) {
    long long groups = (V + 3) / 4;
    *g0 = (int)(part * groups / parts);
    *g1 = (int)((part + 1) * groups / parts);
}
// The logits of group g (tokens 4g .. 4g+3 below V) into xg: one 16-byte load when the row is
// 16-byte aligned (vec) and the group is whole, else one load per token (those past V are 0 and
// never used).
__device__ __forceinline__ void sample_load_group(float (&xg)[4], const float *x, int g, int V, bool vec) {
    if (vec && 4 * g + 3 < V) {
        float4 q = reinterpret_cast<const float4 *>(x)[g];
        xg[0] = q.x;
        xg[1] = q.y;
        xg[2] = q.z;
        xg[3] = q.w;
    } else {
        #pragma unroll
        for (int e = 0; e < 4; e++) xg[e] = 4 * g + e < V ? x[4 * g + e] : 0.0f;
    }
}

// grid (n_rows * split_blocks): block r * split_blocks + s writes stats[blockIdx.x], the
// statistics of row r's range s (pass 1 of the one-block kernel over the range), and for
// temperature > 0 best[blockIdx.x], the range's best (Gumbel score, token), each score computed as
// the one-block kernel does; one read of the range for both. Returns at once when the config is
// not the split path's.
__global__ void __launch_bounds__(SAMPLE_SPLIT_THREADS, SAMPLE_SPLIT_BLOCKS_PER_SM)
sample_rows_split_kernel(SampleSplitStats *stats, SampleBest *best_out, const float *logits, int V, int Vp,
                         const SampleConfig *cfg, const uint64_t *row_key, const int *row_step, int split_blocks) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    __shared__ SampleMaxSum red_ms[SAMPLE_SPLIT_WARPS];
    __shared__ SampleBest red_best[SAMPLE_SPLIT_WARPS];
    __shared__ int s_bad;
    const float temperature = cfg->temperature;
    if (!sample_split_config(temperature, cfg->top_k, cfg->top_p, V)) return;   // block-uniform
    const bool draw = temperature > 0.0f;
    int r = blockIdx.x / split_blocks, g0, g1;
    sample_split_range(blockIdx.x % split_blocks, split_blocks, V, &g0, &g1);
    const float *x = logits + (size_t)r * Vp;
    const bool vec = ((uintptr_t)x & 15) == 0;
    const float inv_t = draw ? 1.0f / temperature : 0.0f;
    const uint64_t key = row_key[r];
    const int step = row_step[r];
    if (threadIdx.x == 0) s_bad = 0;
    __syncthreads();
    // each thread's tokens in increasing order, so that its argmax is the smallest id of its max
    SampleMaxSum ms = {-INFINITY, 0.0f, INT_MAX};
    SampleBest best = {-INFINITY, INT_MAX};
    bool bad = false;
    for (int g = g0 + threadIdx.x; g < g1; g += blockDim.x) {
        float xg[4];
        sample_load_group(xg, x, g, V, vec);
        Philox4x32 bits;
        if (draw) bits = philox_sampling_block(key, (uint32_t)g, (uint32_t)step);
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            int v = 4 * g + e;
            if (v >= V) break;
            float xv = xg[e];
            if (!isfinite(xv)) { bad = true; continue; }   // the row is flagged: its draw is not used
            sample_max_sum_add(ms, xv, v);
            if (draw) {
                SampleBest cand = {sample_gumbel_score(xv, inv_t, bits.v[e]), v};
                best = sample_best_combine(best, cand);
            }
        }
    }
    if (bad) s_bad = 1;
    ms = sample_block_max_sum<SAMPLE_SPLIT_WARPS>(ms, red_ms);   // its barriers publish s_bad
    if (draw) best = sample_block_best<SAMPLE_SPLIT_WARPS>(best, red_best);
    if (threadIdx.x == 0) {
        SampleSplitStats out = {ms.m, ms.s, ms.idx, s_bad};
        stats[blockIdx.x] = out;
        if (draw) best_out[blockIdx.x] = best;
    }
}

// ---------------------------------------------------------------------------------------------
// the reference kernel

// grid (n_rows), block 256. flags (n_rows, V) bytes of scratch: 1 for the tokens of the set.
__global__ void sample_rows_reference_kernel(int *out_token, float *out_logprob, const float *logits, int V, int Vp,
                                             const SampleConfig *cfg, const uint64_t *row_key, int *row_step,
                                             int *row_token, int *row_pos, const int *row_slot, int dummy_slot,
                                             int *err, unsigned char *flags) {
    __shared__ float s_max, s_lse;
    __shared__ int s_argmax, s_bad;
    __shared__ unsigned long long s_need;
    int r = blockIdx.x;
    const float *x = logits + (size_t)r * Vp;
    unsigned char *in_set = flags + (size_t)r * V;
    const float temperature = cfg->temperature;
    const int top_k = cfg->top_k;
    const float top_p = cfg->top_p;
    const int step = row_step[r];
    if (threadIdx.x == 0) {
        float m = -INFINITY;
        int arg = 0, bad = 0;
        for (int v = 0; v < V; v++) {
            if (!isfinite(x[v])) bad = 1;
            else if (x[v] > m) { m = x[v]; arg = v; }
        }
        double sum = 0.0;
        for (int v = 0; v < V && !bad; v++) sum += exp((double)x[v] - m);
        s_max = m;
        s_argmax = arg;
        s_lse = (float)(m + log(sum));
        s_bad = bad;
    }
    __syncthreads();
    if (s_bad) {
        if (threadIdx.x == 0) { atomicOr(err, SAMPLE_ERR_NONFINITE_LOGITS); out_token[r] = 0; out_logprob[r] = NAN; }
        return;
    }
    const float max_logit = s_max;
    int chosen = s_argmax;
    if (temperature > 0.0f && top_p < 1.0f && V > 64 * (int)blockDim.x) {
        // top-p keeps 64 decisions per thread in registers
        if (threadIdx.x == 0) { atomicOr(err, SAMPLE_ERR_REFERENCE_VOCAB); out_token[r] = 0; out_logprob[r] = NAN; }
        return;
    }
    if (temperature > 0.0f) {
        const float inv_t = 1.0f / temperature;
        bool use_k = top_k > 0 && top_k < V;
        // top-k: the tokens with fewer than k larger keys
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            uint64_t kv = sample_key(x[v], v);
            int larger = 0;
            if (use_k)
                for (int u = 0; u < V; u++) larger += sample_key(x[u], u) > kv;
            in_set[v] = !use_k || larger < top_k;
        }
        __syncthreads();
        if (top_p < 1.0f) {
            if (threadIdx.x == 0) {
                unsigned long long total = 0;
                for (int v = 0; v < V; v++)
                    if (in_set[v]) total += sample_mass(x[v], max_logit, inv_t);
                unsigned long long need = (unsigned long long)ceil((double)top_p * (double)total);
                s_need = need < 1ull ? 1ull : (need > total ? total : need);
            }
            __syncthreads();
            // top-p: the tokens of the top-k set whose mass before them is below the target;
            // the decision for every token is made before any flag is cleared
            unsigned char keep[64];
            int n_mine = 0;
            for (int v = threadIdx.x; v < V; v += blockDim.x, n_mine++) {
                uint64_t kv = sample_key(x[v], v);
                unsigned long long before = 0;
                if (in_set[v])
                    for (int u = 0; u < V; u++)
                        if (in_set[u] && sample_key(x[u], u) > kv) before += sample_mass(x[u], max_logit, inv_t);
                if (n_mine < 64) keep[n_mine] = in_set[v] && before < s_need;
            }
            __syncthreads();
            n_mine = 0;
            for (int v = threadIdx.x; v < V; v += blockDim.x, n_mine++)
                if (n_mine < 64) in_set[v] = keep[n_mine];
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            float best = -INFINITY;
            int best_v = -1;
            for (int v = 0; v < V; v++) {
                if (!in_set[v]) continue;
                Philox4x32 bits = philox_sampling_block(row_key[r], (uint32_t)(v / 4), (uint32_t)step);
                float score = sample_gumbel_score(x[v], inv_t, bits.v[v % 4]);
                if (best_v < 0 || score > best) { best = score; best_v = v; }
            }
            chosen = best_v;
        }
    }
    if (threadIdx.x == 0) {
        out_token[r] = chosen;
        out_logprob[r] = x[chosen] - s_lse;
        if (row_token != NULL && row_slot[r] != dummy_slot) {
            row_token[r] = chosen;
            row_pos[r] += 1;
            row_step[r] += 1;
        }
    }
}

// The reference kernel's top-p keeps at most 64 tokens per thread in registers: V <= 64 * 256.
#define SAMPLE_REFERENCE_MAX_V (64 * 256)

// Raises the fast kernel's dynamic shared memory limit; call once before launching (and before
// any CUDA graph capture). Exits with a message when the device has too little shared memory.
static inline void sampling_setup(void) {
    int device = 0, optin = 0;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaRequire((size_t)optin >= SAMPLE_DYNAMIC_SMEM + 8192,
                "sampling: the device's shared memory per block is too small for the sampler's histograms");
    cudaCheck(cudaFuncSetAttribute(sample_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SAMPLE_DYNAMIC_SMEM));
}

// The split path's scratch, allocated by the caller for up to max_rows rows: stats and best
// hold max_rows * SAMPLE_SPLIT_MAX_BLOCKS entries each (no initialisation needed: every entry a
// call reads was written by the same call). sms, the GPU's multiprocessor count, sets the blocks
// per row.
typedef struct {
    SampleSplitStats *stats;
    SampleBest *best;
    int max_rows;
    int sms;
} SampleSplitScratch;

// Blocks per row of the split path: as many as fit n_rows rows in one wave of
// SAMPLE_SPLIT_BLOCKS_PER_SM blocks per SM (a second, partial wave would leave SMs idle), at
// most SAMPLE_SPLIT_MAX_BLOCKS, and at most one per SAMPLE_SPLIT_THREADS groups of 4 tokens, so
// that every thread has a group (more blocks would only add partials to merge).
static inline int sample_split_blocks(int n_rows, int V, int sms) {
    int s = SAMPLE_SPLIT_BLOCKS_PER_SM * sms / n_rows;
    int by_groups = (V + 3) / 4 / SAMPLE_SPLIT_THREADS;
    if (s > by_groups) s = by_groups;
    if (s > SAMPLE_SPLIT_MAX_BLOCKS) s = SAMPLE_SPLIT_MAX_BLOCKS;
    return s < 1 ? 1 : s;
}

// Samples one token for each of n_rows rows (see the kernels). reference selects the plain
// kernel, which needs flags (n_rows * V bytes), and V <= SAMPLE_REFERENCE_MAX_V for top-p (else
// it sets SAMPLE_ERR_REFERENCE_VOCAB). Otherwise, with split (not NULL), the device takes the
// split path for greedy and plain temperature sampling and the one-block kernel for top-k and
// top-p; with split NULL, the one-block kernel does every case.
static inline void sample_rows(int *out_token, float *out_logprob, const float *logits, int n_rows, int V, int Vp,
                               const SampleConfig *cfg, const uint64_t *row_key, int *row_step, int *row_token,
                               int *row_pos, const int *row_slot, int dummy_slot, int *err, int reference,
                               unsigned char *flags, const SampleSplitScratch *split, cudaStream_t stream) {
    cudaRequire(n_rows >= 1 && V >= 1 && V <= Vp, "sample_rows: need n_rows >= 1 and 1 <= V <= Vp");
    cudaRequire(row_token == NULL || (row_pos != NULL && row_slot != NULL), "sample_rows: advancing rows needs row_pos and row_slot");
    if (reference) {
        cudaRequire(flags != NULL, "sample_rows: the reference sampler needs its flags scratch");
        sample_rows_reference_kernel<<<n_rows, 256, 0, stream>>>(out_token, out_logprob, logits, V, Vp, cfg, row_key, row_step,
                                                                 row_token, row_pos, row_slot, dummy_slot, err, flags);
        cudaCheckLaunch();
        return;
    }
    SampleSplitStats *stats = NULL;
    SampleBest *best = NULL;
    int blocks = 0;   // per row; 0: the one-block kernel alone
    if (split != NULL) {
        cudaRequire(split->stats != NULL && split->best != NULL && n_rows <= split->max_rows && split->sms >= 1,
                    "sample_rows: the split scratch needs its buffers for n_rows rows and the multiprocessor count");
        stats = split->stats;
        best = split->best;
        blocks = sample_split_blocks(n_rows, V, split->sms);
        sample_rows_split_kernel<<<n_rows * blocks, SAMPLE_SPLIT_THREADS, 0, stream>>>(stats, best, logits, V, Vp, cfg,
                                                                                       row_key, row_step, blocks);
        cudaCheckLaunch();
    }
    sample_rows_kernel<<<n_rows, SAMPLE_THREADS, SAMPLE_DYNAMIC_SMEM, stream>>>(out_token, out_logprob, logits, V, Vp, cfg,
                                                                                row_key, row_step, row_token, row_pos,
                                                                                row_slot, dummy_slot, err, stats, best,
                                                                                blocks);
    cudaCheckLaunch();
}
#endif
