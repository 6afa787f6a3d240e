// The action expert's whole flow loop as one function on AMX tiles (see physis/runtime/fused.py).
//
// At batch 1 a flow step is ~16 tokens through a few small layers: a few microseconds of arithmetic behind tens
// of library calls, each with its own dispatch, allocation and thread hand-off. Here one call runs every step
// of a chunk on one core: matmuls as AMX bf16 tile products against weights packed once, activations kept in
// float32 and rounded to bf16 only where they enter a matmul, attention over the cached context with the action
// tokens' keys and values packed in place per step.
#include "amx.h"

using namespace amx;

// One chunk's flow loop. Weights: per layer [ln1_w, ln1_b, qkv, qkv_b, proj, proj_b, ln2_w, ln2_b, fc1, fc1_b,
// fc2, fc2_b] (matmul weights packed bf16 tiles, the rest float32), then [w_x, w_out, norm_w, norm_b, out, out_b].
// Context per layer: keys and values (heads, n, 32) float32; valid (n) float32, 1 where a key may be attended.
torch::Tensor amx_flow(torch::Tensor noise, std::vector<torch::Tensor> weights, std::vector<double> eps,
                       std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, torch::Tensor valid,
                       torch::Tensor step_terms, torch::Tensor out_term, torch::Tensor target, torch::Tensor weight,
                       torch::Tensor action_mask, int64_t heads, int64_t head_dim, int64_t steps) {
  TORCH_CHECK(request_amx(), "amx_flow: the kernel could not enable AMX tiles on this CPU");
  const int A = noise.size(1), AP = (A + 31) / 32 * 32, AO = (A + 15) / 16 * 16;
  const int D = out_term.size(1), W = heads * head_dim, L = keys.size();
  const int n_ctx = valid.size(0), ctx = (n_ctx + 31) / 32 * 32;  // the context, padded to whole key blocks
  const int nkp = ctx + 32;  // then the 16 action tokens' keys and 16 unused slots
  TORCH_CHECK(noise.size(0) == T && head_dim == 32, "amx_flow: 16 action tokens and head_dim 32 expected");
  TORCH_CHECK(static_cast<int>(weights.size()) == 12 * L + 6, "amx_flow: wrong number of weights");
  const int H = weights[8].size(0) / D;  // fc1's packed rows: hidden x D values
  const std::vector<Layer> layers = read_layers(weights, eps, L);
  const auto* top = &weights[12 * L];
  const bf16 *w_x = b16(top[0]), *w_out = b16(top[1]), *w_act = b16(top[4]);
  const float *norm_w = f32(top[2]), *norm_b = f32(top[3]), *act_b = f32(top[5]);
  const float norm_eps = static_cast<float>(eps[2 * L]);

  torch::Tensor x_out = noise.clone();
  float* x = x_out.data_ptr<float>();
  const float *terms = f32(step_terms), *out_t = f32(out_term), *tgt = f32(target), *wt = f32(weight),
              *amask = f32(action_mask), *ok = f32(valid);
  std::vector<float> kbias(nkp, -INFINITY);
  for (int j = 0; j < n_ctx; ++j) kbias[j] = ok[j] > 0.f ? 0.f : -INFINITY;
  std::fill(kbias.begin() + ctx, kbias.begin() + ctx + T, 0.f);

  std::vector<float> h(T * D), tmp(T * std::max({3 * W, H, D, AO})), att(T * W), scores(T * nkp), v(T * AO);
  std::vector<bf16> a16(T * std::max({W, H, D, AP}), 0), p16(T * nkp), q16(T * 32);
  // per layer, the context's keys as B tiles of S = Q K^T (heads, nkp/16, 512) and its values as B tiles of
  // O = P V (heads, 2, nkp/32, 512), packed once a chunk; each step writes its action tokens' tiles in place
  std::vector<std::vector<bf16>> kpack(L), vpack(L);
  for (int l = 0; l < L; ++l) {
    TORCH_CHECK(keys[l].size(1) == n_ctx && values[l].size(1) == n_ctx, "amx_flow: context length mismatch");
    kpack[l].assign(static_cast<size_t>(heads) * (nkp / 16) * BLOCK, 0);
    vpack[l].assign(static_cast<size_t>(heads) * (nkp / 32) * 2 * BLOCK, 0);
    const float *kl = f32(keys[l]), *vl = f32(values[l]);
    for (int hd = 0; hd < heads; ++hd) {
      const float *kh = kl + static_cast<size_t>(hd) * n_ctx * 32, *vh = vl + static_cast<size_t>(hd) * n_ctx * 32;
      pack_key_rows(kh, n_ctx, kpack[l].data() + static_cast<size_t>(hd) * (nkp / 16) * BLOCK);
      pack_value_rows(vh, n_ctx, 32, nkp, vpack[l].data() + static_cast<size_t>(hd) * (nkp / 32) * 2 * BLOCK);
    }
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  const float dt = 1.f / steps;
  configure_tiles();
  // flush denormals: softmax weights of masked keys and GELU's far tails fall there, and each costs a microcode assist
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040);

  for (int step = 0; step < steps; ++step) {
    const float t = 1.f - step * dt;
    // action tokens: silu(x W_x + step term) W_out + out term
    std::fill(a16.begin(), a16.begin() + T * AP, 0);
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < A; ++j) a16[i * AP + j] = one_bf16(x[i * A + j]);
    gemm16(a16.data(), AP, w_x, AP, D, tmp.data(), D);
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < D; j += 16) {
        const __m512 z = _mm512_add_ps(_mm512_loadu_ps(tmp.data() + i * D + j),
                                       _mm512_loadu_ps(terms + step * D + j));
        const __m512 s = _mm512_mul_ps(z, recip(_mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), z)))));
        _mm512_storeu_ps(tmp.data() + i * D + j, s);
      }
    to_bf16(tmp.data(), a16.data(), T * D);
    gemm16(a16.data(), D, w_out, D, D, h.data(), D);
    for (int k = 0; k < T * D; k += 16)
      _mm512_storeu_ps(h.data() + k, _mm512_add_ps(_mm512_loadu_ps(h.data() + k), _mm512_loadu_ps(out_t + k)));

    for (int l = 0; l < L; ++l) {
      const Layer& ly = layers[l];
      layer_norm_bf16(h.data(), T, D, ly.ln1_w, ly.ln1_b, ly.eps1, a16.data());
      float* qkv = tmp.data();  // (16, 3, heads, 32)
      gemm16(a16.data(), D, ly.qkv, D, 3 * W, qkv, 3 * W);
      add_bias(qkv, T, 3 * W, ly.qkv_b);
      for (int hd = 0; hd < heads; ++hd) {
        // this step's keys: one tile of 16 keys at block ctx/16; values: the first half of block ctx/32
        bf16* kp = kpack[l].data() + (static_cast<size_t>(hd) * (nkp / 16) + ctx / 16) * BLOCK;
        bf16* vp = vpack[l].data() + static_cast<size_t>(hd) * (nkp / 32) * 2 * BLOCK;  // (2, nkp/32, 512)
        pack_key_rows(qkv + W + hd * 32, T, kp, 3 * W);
        pack_value_rows(qkv + 2 * W + hd * 32, T, 3 * W, nkp, vp, ctx);
        pack_queries(qkv + hd * 32, 3 * W, scale, q16.data());
        // scores over the context and the action tokens (the last 16 slots are padding, never attended)
        const int nk = ctx + 16;
        gemm16(q16.data(), 32, kpack[l].data() + static_cast<size_t>(hd) * (nkp / 16) * BLOCK, 32, nk,
               scores.data(), nkp);
        // softmax without its division: P = exp(s - max) in bf16, and each output row scaled by 1 / sum after
        float inv[T];
        for (int i = 0; i < T; ++i)
          inv[i] = softmax_row(scores.data() + i * nkp, kbias.data(), nk, nkp, p16.data() + i * nkp);
        float* o = att.data() + hd * 32;
        gemm16(p16.data(), nkp, vpack[l].data() + static_cast<size_t>(hd) * (nkp / 32) * 2 * BLOCK, nkp, 32, o, W);
        scale_rows(o, W, inv);
      }
      to_bf16(att.data(), a16.data(), T * W);
      gemm16(a16.data(), W, ly.proj, W, D, tmp.data(), D);
      add_residual(h.data(), tmp.data(), T, D, ly.proj_b);
      layer_norm_bf16(h.data(), T, D, ly.ln2_w, ly.ln2_b, ly.eps2, a16.data());
      gemm16(a16.data(), D, ly.fc1, D, H, tmp.data(), H);
      bias_gelu(tmp.data(), T, H, ly.fc1_b);
      to_bf16(tmp.data(), a16.data(), T * H);
      gemm16(a16.data(), H, ly.fc2, H, D, tmp.data(), D);
      add_residual(h.data(), tmp.data(), T, D, ly.fc2_b);
    }
    // velocity = action_out(norm(h)); one Euler step that steers the clean estimate toward the target
    layer_norm_bf16(h.data(), T, D, norm_w, norm_b, norm_eps, a16.data());
    gemm16(a16.data(), D, w_act, D, AO, v.data(), AO);
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < A; ++j) {
        const float vel = v[i * AO + j] + act_b[j], xi = x[i * A + j];
        float clean = xi - t * vel;
        const float nz = xi + (1.f - t) * vel;
        clean += wt[i] * (tgt[i * A + j] - clean);
        x[i * A + j] = (t - dt) * nz + (1.f - t + dt) * clean;
      }
  }
  _tile_release();
  _mm_setcsr(csr);
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < A; ++j) x[i * A + j] = (wt[i] == 1.f ? tgt[i * A + j] : x[i * A + j]) * amask[j];
  return x_out;
}

