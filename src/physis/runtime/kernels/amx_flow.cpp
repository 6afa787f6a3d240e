// The action expert's whole flow loop as one function on bf16 tiles (see physis/runtime/fused.py).
//
// At batch 1 a flow step is ~16 tokens through a few small layers: a few microseconds of arithmetic behind tens
// of library calls, each with its own dispatch, allocation and thread hand-off. Here one call runs every step
// of a chunk: matmuls as bf16 tile products (amx.h) against weights packed once, activations kept in float32 and
// rounded to bf16 only where they enter a matmul, attention over the cached context with the action tokens' keys
// and values packed in place per step.
//
// Two threads share the flow loop in one of two ways, as the ISA's costs favour:
// - On AMX the layers are split between them, the first half on one core and the rest (with the velocity and the
//   Euler update) on the other, and the 16 tokens' state is handed across twice a step. The steps stay strictly in
//   order, so one core waits while the other works; what pays is that each core's cache then holds only its own
//   layers' weights and packed context. (A hand-off there costs microseconds: splitting each layer lost.)
// - On AVX-512 BF16 each layer is split: each core takes half the heads (their qkv columns, attention and rows of
//   the output projection) and half the MLP's hidden columns, and the two partial sums of each half-layer are
//   exchanged (8 KB, under a microsecond), then added in a fixed order by both. Each core keeps its own copy of the
//   tokens' state and runs the small token-in and velocity matmuls itself. One thread runs both halves in turn,
//   so one core and two give the same numbers.
#include <omp.h>

#include <atomic>
#include <memory>

#include "amx.h"

using namespace amx;

namespace {

// one thread's working buffers for the 16 action tokens
struct Scratch {
  std::vector<float> tmp, att, scores, v;
  std::vector<bf16> a16, p16, q16;
  Scratch(int W, int H, int D, int AO, int AP, int nkp)
      : tmp(T * std::max({3 * W, H, D, AO})), att(T * W), scores(T * nkp), v(T * AO),
        a16(T * std::max({W, H, D, AP}), 0), p16(T * nkp), q16(T * 32) {}
};

// What the steps read and write: sizes, weights, per-step terms, and per layer the packed keys and values of the
// context with the action tokens' own slots after it. The tokens' state, x (16 x A) and h (16 x D), is passed in:
// shared by the threads when they split the layers, one copy each when they split every layer.
struct Flow {
  int A, AP, AO, D, W, H, heads, nkp, ctx;
  std::vector<Layer> layers;
  const bf16 *w_x, *w_out, *w_act;
  const float *norm_w, *norm_b, *act_b, *terms, *out_t, *tgt, *wt;
  float norm_eps, scale, dt;
  std::vector<__mmask16> kmask;  // the keys an action token may attend, 16 a mask
  std::vector<std::unique_ptr<bf16[]>> kpack, vpack;
  size_t kstride, vstride;  // one head's packed keys, values

  // heads h0 .. h1 of layer l's context, (heads, n_ctx, 32) float32 keys and values, as the B tiles of S = Q K^T
  // (heads, nkp/16, 512) and of O = P V (heads, 2, nkp/32, 512); the padding zero
  void pack_context(int l, const float* kl, const float* vl, int n_ctx, int h0, int h1) {
    for (int hd = h0; hd < h1; ++hd) {
      bf16 *kh = kpack[l].get() + hd * kstride, *vh = vpack[l].get() + hd * vstride;
      std::fill(kh, kh + kstride, 0);
      std::fill(vh, vh + vstride, 0);
      pack_key_rows(kl + static_cast<size_t>(hd) * n_ctx * 32, n_ctx, kh);
      pack_value_rows(vl + static_cast<size_t>(hd) * n_ctx * 32, n_ctx, 32, nkp, vh);
    }
  }

  // the action tokens: h = silu(x W_x + step term) W_out + out term
  void tokens_in(int step, const float* x, float* h, Scratch& s) const {
    std::fill(s.a16.begin(), s.a16.begin() + T * AP, 0);
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < A; ++j) s.a16[i * AP + j] = one_bf16(x[i * A + j]);
    gemm16(s.a16.data(), AP, w_x, AP, D, s.tmp.data(), D);
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < D; j += 16) {
        const __m512 z = _mm512_add_ps(_mm512_loadu_ps(s.tmp.data() + i * D + j),
                                       _mm512_loadu_ps(terms + step * D + j));
        _mm512_storeu_ps(s.tmp.data() + i * D + j, z_sigmoid(z, _mm512_mul_ps(_mm512_set1_ps(-LOG2E), z)));
      }
    to_bf16(s.tmp.data(), s.a16.data(), T * D);
    gemm16(s.a16.data(), D, w_out, D, D, h, D);
    for (int k = 0; k < T * D; k += 16)
      _mm512_storeu_ps(h + k, _mm512_add_ps(_mm512_loadu_ps(h + k), _mm512_loadu_ps(out_t + k)));
  }

  // attention of heads h0 .. h1 of layer l over the context and the action tokens, from s.a16 (h after norm1, bf16)
  // into those heads' columns of s.att
  void attend(int l, int h0, int h1, Scratch& s) {
    const Layer& ly = layers[l];
    float* qkv = s.tmp.data();  // (16, 3, heads, 32)
    for (int part = 0; part < 3; ++part) {  // the q, k and v columns of these heads
      const int c0 = part * W + h0 * 32, n = (h1 - h0) * 32;
      gemm16(s.a16.data(), D, ly.qkv + static_cast<size_t>(c0 / 16) * (D / 32) * BLOCK, D, n, qkv + c0, 3 * W);
      add_bias(qkv + c0, T, n, ly.qkv_b + c0, 3 * W);
    }
    for (int hd = h0; hd < h1; ++hd) {
      // this step's keys: one tile of 16 keys at block ctx/16; values: the first half of block ctx/32
      bf16 *kh = kpack[l].get() + hd * kstride, *vh = vpack[l].get() + hd * vstride;
      pack_key_rows(qkv + W + hd * 32, T, kh + (ctx / 16) * BLOCK, 3 * W);
      pack_value_rows(qkv + 2 * W + hd * 32, T, 3 * W, nkp, vh, ctx);
      pack_queries(qkv + hd * 32, 3 * W, scale, s.q16.data());
      // scores over the context and the action tokens (the last 16 slots are padding, never attended)
      const int nk = ctx + 16;
      gemm16(s.q16.data(), 32, kh, 32, nk, s.scores.data(), nkp);
      float inv[T];
      for (int i = 0; i < T; ++i)
        inv[i] = softmax_row(s.scores.data() + i * nkp, kmask.data(), nk, nkp, s.p16.data() + i * nkp);
      float* o = s.att.data() + hd * 32;
      gemm16(s.p16.data(), nkp, vh, nkp, 32, o, W);
      scale_rows(o, W, inv);
    }
  }

  // h through expert layer l, attending to the context and the action tokens
  void layer(int l, float* h, Scratch& s) {
    const Layer& ly = layers[l];
    layer_norm_bf16(h, T, D, ly.ln1_w, ly.ln1_b, ly.eps1, s.a16.data());
    attend(l, 0, heads, s);
    to_bf16(s.att.data(), s.a16.data(), T * W);
    gemm16(s.a16.data(), W, ly.proj, W, D, s.tmp.data(), D);
    add_residual(h, s.tmp.data(), T, D, ly.proj_b);
    mlp(l, h, 0, H, s, s.tmp.data());
    add_residual(h, s.tmp.data(), T, D, ly.fc2_b);
  }

  // the heads of half `half` of layer l: their attention through their rows of the output projection, into out
  // (16 x D, without the bias)
  void attention_half(int l, int half, const float* h, Scratch& s, float* out) {
    const Layer& ly = layers[l];
    const int h0 = heads * half / 2, h1 = heads * (half + 1) / 2, n = (h1 - h0) * 32;
    layer_norm_bf16(h, T, D, ly.ln1_w, ly.ln1_b, ly.eps1, s.a16.data());
    attend(l, h0, h1, s);
    for (int i = 0; i < T; ++i) to_bf16(s.att.data() + i * W + h0 * 32, s.a16.data() + i * n, n);
    gemm16(s.a16.data(), n, ly.proj + h0 * BLOCK, n, D, out, D, W / 32);  // the k-blocks of these heads
  }

  // hidden columns c0 .. c1 of layer l's MLP: norm2, fc1, GELU, and their rows of fc2, into out (16 x D, without
  // fc2's bias); c0 and c1 multiples of 32
  void mlp(int l, const float* h, int c0, int c1, Scratch& s, float* out) {
    const Layer& ly = layers[l];
    const int n = c1 - c0;
    layer_norm_bf16(h, T, D, ly.ln2_w, ly.ln2_b, ly.eps2, s.a16.data());
    gemm16(s.a16.data(), D, ly.fc1 + static_cast<size_t>(c0 / 16) * (D / 32) * BLOCK, D, n, s.tmp.data(), n);
    bias_gelu_bf16(s.tmp.data(), T, n, ly.fc1_b + c0, s.a16.data());
    gemm16(s.a16.data(), n, ly.fc2 + (c0 / 32) * BLOCK, n, D, out, D, H / 32);
  }

  // velocity = action_out(norm(h)); one Euler step that steers the clean estimate toward the target
  void velocity_out(int step, float* x, const float* h, Scratch& s) const {
    const float t = 1.f - step * dt;
    layer_norm_bf16(h, T, D, norm_w, norm_b, norm_eps, s.a16.data());
    gemm16(s.a16.data(), D, w_act, D, AO, s.v.data(), AO);
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < A; ++j) {
        const float vel = s.v[i * AO + j] + act_b[j], xi = x[i * A + j];
        float clean = xi - t * vel;
        const float nz = xi + (1.f - t) * vel;
        clean += wt[i] * (tgt[i * A + j] - clean);
        x[i * A + j] = (t - dt) * nz + (1.f - t + dt) * clean;
      }
  }
};

void wait_for(const std::atomic<int>& flag, int value) {
  while (flag.load(std::memory_order_acquire) < value) _mm_pause();
}

// the two halves' partial sums of each half-layer, double-buffered: a thread writes exchange e's slot only after the
// other has published e - 1, by which time it has read e - 2's, the same slot
struct Exchange {
  std::vector<float> slots;  // (2, 2, 16 x D)
  alignas(64) std::atomic<int> done0{-1};
  alignas(64) std::atomic<int> done1{-1};
  int size;
  explicit Exchange(int D) : slots(4 * T * D), size(T * D) {}
  float* slot(int e, int half) { return slots.data() + ((e % 2) * 2 + half) * size; }
  std::atomic<int>& done(int half) { return half ? done1 : done0; }
};

// h += (p0 + p1) + bias, in this order on both threads
inline void add_halves(float* h, const float* p0, const float* p1, const float* bias, int D) {
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < D; j += 16) {
      const int k = i * D + j;
      const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(p0 + k), _mm512_loadu_ps(p1 + k)),
                                     _mm512_loadu_ps(bias + j));
      _mm512_storeu_ps(h + k, _mm512_add_ps(_mm512_loadu_ps(h + k), r));
    }
}

}  // namespace

// One chunk's flow loop. Weights: per layer [ln1_w, ln1_b, qkv, qkv_b, proj, proj_b, ln2_w, ln2_b, fc1, fc1_b,
// fc2, fc2_b] (matmul weights packed bf16 tiles, the rest float32), then [w_x, w_out, norm_w, norm_b, out, out_b].
// Context per layer: keys and values ([1,] heads, n, 32) float32; valid (n) bool, true where a key may be attended;
// action_mask (A) bool, the body's action slots.
// threads: 1, or 2 to share the loop between two cores (more are not used); split: how two share it, 0 as the ISA
// favours (see the top of this file), 1 the layers between them, 2 each layer in halves.
torch::Tensor amx_flow(torch::Tensor noise, const std::vector<torch::Tensor>& weights, const std::vector<double>& eps,
                       std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, torch::Tensor valid,
                       torch::Tensor step_terms, torch::Tensor out_term, torch::Tensor target, torch::Tensor weight,
                       torch::Tensor action_mask, int64_t heads, int64_t head_dim, int64_t steps, int64_t threads,
                       int64_t split) {
  TORCH_CHECK(tiles_ready(), "amx_flow: the kernel could not enable AMX tiles on this CPU");
  Flow f;
  f.A = noise.size(1);
  f.AP = (f.A + 31) / 32 * 32;
  f.AO = (f.A + 15) / 16 * 16;
  f.D = out_term.size(1);
  f.W = heads * head_dim;
  f.heads = heads;
  const int L = keys.size(), n_ctx = valid.size(0);
  f.ctx = (n_ctx + 31) / 32 * 32;  // the context, padded to whole key blocks
  f.nkp = f.ctx + 32;              // then the 16 action tokens' keys and 16 unused slots
  TORCH_CHECK(noise.size(0) == T && head_dim == 32, "amx_flow: 16 action tokens and head_dim 32 expected");
  TORCH_CHECK(noise.is_contiguous() && noise.scalar_type() == torch::kFloat32, "amx_flow: noise must be float32");
  TORCH_CHECK(static_cast<int>(weights.size()) == 12 * L + 6, "amx_flow: wrong number of weights");
  f.H = weights[8].size(0) / f.D;  // fc1's packed rows: hidden x D values
  f.layers = read_layers(weights, eps, L);
  const auto* top = &weights[12 * L];
  f.w_x = b16(top[0]);
  f.w_out = b16(top[1]);
  f.w_act = b16(top[4]);
  f.norm_w = f32(top[2]);
  f.norm_b = f32(top[3]);
  f.act_b = f32(top[5]);
  f.norm_eps = static_cast<float>(eps[2 * L]);
  f.terms = f32(step_terms);
  f.out_t = f32(out_term);
  f.tgt = f32(target);
  f.wt = f32(weight);
  f.scale = LOG2E / std::sqrt(static_cast<float>(head_dim));  // scores in base 2
  f.dt = 1.f / steps;

  torch::Tensor x_out = noise.clone();
  const bool bool_masks = valid.scalar_type() == torch::kBool && action_mask.scalar_type() == torch::kBool;
  TORCH_CHECK(bool_masks && valid.is_contiguous() && action_mask.is_contiguous() && action_mask.numel() == f.A,
              "amx_flow: valid and action_mask must be contiguous bool, action_mask one per action dimension");
  const bool* ok = valid.data_ptr<bool>();
  std::vector<float> kbias(f.nkp, -INFINITY);
  for (int j = 0; j < n_ctx; ++j) kbias[j] = ok[j] ? 0.f : -INFINITY;
  std::fill(kbias.begin() + f.ctx, kbias.begin() + f.ctx + T, 0.f);
  f.kmask = key_masks(kbias.data(), f.nkp);
  for (int l = 0; l < L; ++l)
    for (const auto* c : {&keys[l], &values[l]})
      TORCH_CHECK(c->size(-2) == n_ctx && c->numel() == heads * n_ctx * 32 && c->is_contiguous() &&
                      c->scalar_type() == torch::kFloat32,
                  "amx_flow: each layer's context must be contiguous float32 (heads, n, 32), n as valid's");
  f.kstride = static_cast<size_t>(f.nkp / 16) * BLOCK;
  f.vstride = static_cast<size_t>(f.nkp / 32) * 2 * BLOCK;
  for (int l = 0; l < L; ++l) {  // filled by the threads that read them
    f.kpack.emplace_back(new bf16[heads * f.kstride]);
    f.vpack.emplace_back(new bf16[heads * f.vstride]);
  }
  // by default every layer is split in halves without AMX (see the top of this file); that needs two heads or more
  // and whole k-blocks of fc2's rows in each half of the MLP
  TORCH_CHECK(split >= 0 && split <= 2, "amx_flow: split must be 0 (as the ISA favours), 1 (layers) or 2 (halves)");
  const bool halves = (split == 2 || (split == 0 && !use_amx())) && heads >= 2 && f.H % 64 == 0;

  std::vector<float> h(T * f.D);
  const int middle = (L + 1) / 2;  // where the second thread's layers start
  std::atomic<int> h_ready{-1}, x_ready{-1};  // the last step whose h (first half done) or x (step done) is out
  Exchange ex(f.D);
#pragma omp parallel num_threads(threads >= 2 && (L >= 2 || halves) ? 2 : 1)
  {
    // the team OpenMP gives, which may be smaller than asked (a thread limit, a nested region)
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    Scratch s(f.W, f.H, f.D, f.AO, f.AP, f.nkp);
    const ThreadTiles thread_tiles;
    if (halves) {
      // each thread its own state (the first's x is the output); its heads' context, of every layer
      std::vector<float> own_x, own_h(T * f.D);
      if (tid > 0) own_x.assign(f32(noise), f32(noise) + T * f.A);
      float *x = tid == 0 ? x_out.data_ptr<float>() : own_x.data(), *hh = own_h.data();
      const int h0 = team == 1 ? 0 : heads * tid / 2, h1 = team == 1 ? heads : heads * (tid + 1) / 2;
      for (int l = 0; l < L; ++l) f.pack_context(l, f32(keys[l]), f32(values[l]), n_ctx, h0, h1);
      int e = 0;  // exchanges so far, the same count on both threads
      // half `half` of a half-layer into its slot of exchange e, by this thread or (one thread) both in turn
      auto halves_of = [&](auto&& run, const float* bias) {
        for (int half = team == 1 ? 0 : tid; half < (team == 1 ? 2 : tid + 1); ++half) run(half, ex.slot(e, half));
        if (team == 2) {
          ex.done(tid).store(e, std::memory_order_release);
          wait_for(ex.done(1 - tid), e);
        }
        add_halves(hh, ex.slot(e, 0), ex.slot(e, 1), bias, f.D);
        ++e;
      };
      for (int step = 0; step < steps; ++step) {
        f.tokens_in(step, x, hh, s);
        for (int l = 0; l < L; ++l) {
          const Layer& ly = f.layers[l];
          halves_of([&](int half, float* out) { f.attention_half(l, half, hh, s, out); }, ly.proj_b);
          halves_of([&](int half, float* out) { f.mlp(l, hh, f.H / 2 * half, f.H / 2 * (half + 1), s, out); },
                    ly.fc2_b);
        }
        f.velocity_out(step, x, hh, s);
      }
    } else {
      const int l0 = team == 1 || tid == 0 ? 0 : middle, l1 = team == 1 || tid == 1 ? L : middle;
      for (int l = l0; l < l1; ++l) f.pack_context(l, f32(keys[l]), f32(values[l]), n_ctx, 0, heads);
      float* x = x_out.data_ptr<float>();
      for (int step = 0; step < steps; ++step) {
        if (tid == 0) {
          if (team == 2 && step > 0) wait_for(x_ready, step - 1);
          f.tokens_in(step, x, h.data(), s);
        } else {
          wait_for(h_ready, step);
        }
        for (int l = l0; l < l1; ++l) f.layer(l, h.data(), s);
        if (tid == team - 1) f.velocity_out(step, x, h.data(), s);
        if (team == 2) (tid == 0 ? h_ready : x_ready).store(step, std::memory_order_release);
      }
    }
  }
  const bool* amask = action_mask.data_ptr<bool>();
  float* x = x_out.data_ptr<float>();
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < f.A; ++j) {
      const float v = f.wt[i] == 1.f ? f.tgt[i * f.A + j] : x[i * f.A + j];
      x[i * f.A + j] = amask[j] ? v : 0.f;
    }
  return x_out;
}
