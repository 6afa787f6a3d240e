// The prefix's tokens from one observation as one function on bf16 tiles (see physis/runtime/fused.py).
//
// The image tokenizer is a stride-2 3x3 stem (with GELU) and a patchify convolution whose stride is its size: both
// are matmuls over gathered pixels. The stem's outputs are computed in patch order (patch, row in patch, column in
// patch), so that 16 patches' stem outputs, as bf16 rows of channels, are already the patchify matmul's 16 rows.
// The instruction, state, embodiment, query and draft tokens are a few more rows. In a graph this was some twenty
// library calls, each costing more than its arithmetic; here both cores share it in one call.
#include <omp.h>

#include <algorithm>

#include "amx.h"

using namespace amx;

namespace {

// GELU(z) = z (1 + erf(z / sqrt 2)) / 2 as nn.GELU() computes it, erf by Abramowitz and Stegun 7.1.26 (absolute
// error under 1.5e-7, plus the 14-bit reciprocal's and exp2_fast's), for a result rounded to bf16 next
inline __m512 gelu_erf(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 x = _mm512_mul_ps(_mm512_abs_ps(z), _mm512_set1_ps(0.7071067811865476f));
  const __m512 t = _mm512_rcp14_ps(_mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), x, one));
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp2_fast(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-LOG2E)));
  const __m512 erf_abs = _mm512_fnmadd_ps(p, e, one);  // erf(|z| / sqrt 2)
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(INT32_MIN));
  const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), z), _mm512_add_ps(one, erf));
}

class Tokens {
 public:
  // weights, from fused.FusedTokens: stem (packed; K: the 3x3 taps' 27 values in (dy, dx, colour) order, padded to
  // 32), stem_b (Cp), patch (packed; K = half * half * Cp in (ky, kx, channel) order), patch_terms (cameras, history,
  // P, D): the patchify's bias plus the patch, time and camera embeddings; text_ln_w, text_ln_b (text_dim), text
  // (packed), text_terms (max_text, D): the projection's bias plus the position embedding; state (packed, K = 2 S
  // padded to 32), state_b (D); embodiment (E, D); query (0 or 1, D): the environment-state query token; subtask
  // (V, D) and subtask_pos (n_max, D), both (0, D) without a subtask head. Cp is the stem's channels padded to 32.
  Tokens(std::vector<torch::Tensor> weights, double text_eps, int64_t image_size, int64_t half, int64_t channels)
      : w_(std::move(weights)), text_eps_(static_cast<float>(text_eps)), S_(image_size), half_(half), Cp_(channels) {
    TORCH_CHECK(w_.size() == 14, "amx_tokens: 14 weight tensors expected");
    TORCH_CHECK(Cp_ % 32 == 0 && S_ % (2 * half_) == 0, "amx_tokens: channels padded to 32, whole patches");
    const auto& terms = w_[3];
    cameras_ = terms.size(0), history_ = terms.size(1), P_ = terms.size(2), D_ = terms.size(3);
    g_ = S_ / (2 * half_);
    TORCH_CHECK(P_ == g_ * g_ && D_ % 16 == 0, "amx_tokens: a patch grid of g x g, width a multiple of 16");
    Dt_ = w_[4].size(0);
    TORCH_CHECK(Dt_ % 32 == 0, "amx_tokens: the text's width must be a multiple of 32");
    text_max_ = w_[7].size(0);
    Ks_ = static_cast<int>(w_[8].numel() / D_);  // the state matmul's padded K
    E_ = w_[10].size(0);
    V_ = w_[12].size(0);
    query_ = w_[11].size(0) > 0;
  }

  // images (C, T, 3, S, S) float32 in [0, 1]; image_mask (C) bool; state, state_mask (state_dim) float32; text
  // (L, text_dim) float32; text_mask (L) bool; embodiment () int64; draft (n) int64 (n may be 0). Returns tokens
  // (N + n, D) float32, as PrefixTokens orders them (patches camera-major, then frame, then patch; text; state;
  // embodiment; the query, where the model has one; the draft's n embeddings), and the prefix's key mask (N) bool.
  std::vector<torch::Tensor> run(torch::Tensor images, torch::Tensor image_mask, torch::Tensor state,
                                 torch::Tensor state_mask, torch::Tensor text, torch::Tensor text_mask,
                                 int64_t embodiment, torch::Tensor draft, int64_t threads) const {
    TORCH_CHECK(tiles_ready(), "amx_tokens: the kernel could not enable AMX tiles on this CPU");
    TORCH_CHECK(images.dim() == 5 && images.size(0) <= cameras_ && images.size(1) == history_ &&
                    images.size(2) == 3 && images.size(3) == S_ && images.size(4) == S_,
                "amx_tokens: images must be (C <= cameras, history, 3, image_size, image_size)");
    const int C = images.size(0), L = text.size(0), n = draft.size(0);
    TORCH_CHECK(image_mask.size(0) == C && text.dim() == 2 && text.size(1) == Dt_ && L <= text_max_ &&
                    text_mask.size(0) == L && state.numel() == state_mask.numel() && 2 * state.numel() <= Ks_,
                "amx_tokens: the observation's shapes do not match the model");
    for (const auto* t : {&images, &state, &state_mask, &text})
      TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(), "amx_tokens: float32 inputs expected");
    TORCH_CHECK(image_mask.scalar_type() == torch::kBool && text_mask.scalar_type() == torch::kBool &&
                    draft.scalar_type() == torch::kInt64,
                "amx_tokens: bool masks and int64 draft ids expected");
    TORCH_CHECK(embodiment >= 0 && embodiment < E_, "amx_tokens: an embodiment id outside the table");
    const int64_t* ids = draft.data_ptr<int64_t>();
    TORCH_CHECK(n == 0 || n <= w_[13].size(0), "amx_tokens: a draft longer than the model's subtask");
    for (int i = 0; i < n; ++i)
      TORCH_CHECK(ids[i] >= 0 && ids[i] < V_, "amx_tokens: a draft id outside the vocabulary");

    const int frames = C * history_, patch_rows = frames * P_;
    const int N = patch_rows + L + 2 + (query_ ? 1 : 0);
    torch::Tensor tokens = torch::empty({N + n, D_}, torch::TensorOptions().dtype(torch::kFloat32));
    torch::Tensor mask = torch::empty({N}, torch::TensorOptions().dtype(torch::kBool));
    float* out = tokens.data_ptr<float>();
    bool* m = mask.data_ptr<bool>();
    const bool* cam_ok = image_mask.data_ptr<bool>();
    for (int i = 0; i < patch_rows; ++i) m[i] = cam_ok[i / (history_ * P_)];
    std::copy_n(text_mask.data_ptr<bool>(), L, m + patch_rows);
    std::fill(m + patch_rows + L, m + N, true);

    // every frame as bf16 pixels in [-1, 1], channels last, with the convolution's zero border of one pixel
    const int side = S_ + 2;
    std::vector<bf16> pixels(static_cast<size_t>(frames) * side * side * 3, 0);
    const float* img = images.data_ptr<float>();
    const int tiles = (P_ + 15) / 16, units = 1 + frames * tiles;  // unit 0: everything but the patches
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, units)));
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();
      const ThreadTiles thread_tiles;
      for (int r = tid; r < frames * S_; r += team) {  // one image row at a time
        const int f = r / S_, y = r % S_;
        const float* src = img + (static_cast<size_t>(f) * 3 * S_ + y) * S_;
        bf16* dst = pixels.data() + (static_cast<size_t>(f) * side + y + 1) * side * 3 + 3;
        for (int x = 0; x < S_; ++x)
          for (int c = 0; c < 3; ++c) dst[3 * x + c] = one_bf16(2.f * src[static_cast<size_t>(c) * S_ * S_ + x] - 1.f);
      }
#pragma omp barrier
      const size_t rows = 16 * half_ * half_;  // a tile of patches' stem outputs
      std::vector<bf16> gathered(rows * 32, 0), stem(rows * Cp_);
      std::vector<float> acc(std::max(rows * Cp_, static_cast<size_t>(16) * D_));
      for (int u = tid; u < units; u += team) {
        if (u == 0) {
          rest(state, state_mask, text, embodiment, ids, n, out + static_cast<size_t>(patch_rows) * D_, acc.data());
          continue;
        }
        const int f = (u - 1) / tiles, p0 = (u - 1) % tiles * 16, count = std::min(16, P_ - p0);
        patches(pixels.data() + static_cast<size_t>(f) * side * side * 3, p0, count, gathered.data(), stem.data(),
                acc.data());
        const float* terms = w_[3].data_ptr<float>() + (static_cast<size_t>(f) * P_ + p0) * D_;
        float* o = out + (static_cast<size_t>(f) * P_ + p0) * D_;
        for (int i = 0; i < count * D_; i += 16)
          _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_loadu_ps(acc.data() + i), _mm512_loadu_ps(terms + i)));
      }
    }
    return {tokens, mask};
  }

 private:
  // patches p0 .. p0 + count of one frame (pixels: its bordered bf16 image) -> acc (16 x D): the patchify's matmul
  void patches(const bf16* pixels, int p0, int count, bf16* gathered, bf16* stem, float* acc) const {
    const int side = S_ + 2, taps = half_ * half_;
    // each stem output's 3 x 3 x 3 inputs: three runs of 9 values (3 pixels x 3 colours), one per row dy
    for (int i = 0; i < 16; ++i) {
      const int p = p0 + std::min(i, count - 1), py = p / g_, px = p % g_;
      for (int ky = 0; ky < half_; ++ky)
        for (int kx = 0; kx < half_; ++kx) {
          const int sy = py * half_ + ky, sx = px * half_ + kx;
          bf16* row = gathered + ((static_cast<size_t>(i) * half_ + ky) * half_ + kx) * 32;
          for (int dy = 0; dy < 3; ++dy) {
            const bf16* in = pixels + (static_cast<size_t>(2 * sy + dy) * side + 2 * sx) * 3;
            _mm256_mask_storeu_epi16(row + 9 * dy, 0x1FF, _mm256_maskz_loadu_epi16(0x1FF, in));
          }
        }
    }
    const int rows = 16 * taps;
    gemm_rows(gathered, 32, rows / 16, b16(w_[0]), 32, Cp_, acc, Cp_);
    const float* bias = w_[1].data_ptr<float>();
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < Cp_; c += 16) {
        const size_t at = static_cast<size_t>(r) * Cp_ + c;
        const __m512 z = _mm512_add_ps(_mm512_loadu_ps(acc + at), _mm512_loadu_ps(bias + c));
        __m256bh h = _mm512_cvtneps_pbh(gelu_erf(z));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(stem + at), reinterpret_cast<__m256i&>(h));
      }
    // 16 patches' stem outputs are 16 rows of taps x Cp: the patchify's A
    gemm16(stem, taps * Cp_, b16(w_[2]), taps * Cp_, D_, acc, D_);
  }

  // the instruction's, state's, embodiment's, query's and draft's tokens, from row 0 of out on
  void rest(const torch::Tensor& state, const torch::Tensor& state_mask, const torch::Tensor& text, int64_t embodiment,
            const int64_t* ids, int n, float* out, float* acc) const {
    const int L = text.size(0), Lp = (L + 15) / 16 * 16;
    std::vector<float> x(static_cast<size_t>(Lp) * Dt_, 0.f);
    std::copy_n(text.data_ptr<float>(), static_cast<size_t>(L) * Dt_, x.data());
    std::vector<bf16> a(static_cast<size_t>(std::max(Lp * Dt_, 16 * Ks_)), 0);
    layer_norm_bf16(x.data(), Lp, Dt_, w_[4].data_ptr<float>(), w_[5].data_ptr<float>(), text_eps_, a.data());
    std::vector<float> y(static_cast<size_t>(Lp) * D_);
    gemm_rows(a.data(), Dt_, Lp / 16, b16(w_[6]), Dt_, D_, y.data(), D_);
    const float* terms = w_[7].data_ptr<float>();
    for (int i = 0; i < L * D_; ++i) out[i] = y[i] + terms[i];
    out += static_cast<size_t>(L) * D_;
    // the state and its mask, one row: (state, mask) as the projection reads them
    std::fill(a.begin(), a.begin() + 16 * Ks_, bf16(0));
    const int s = state.numel();
    for (int j = 0; j < s; ++j) {
      a[j] = one_bf16(state.data_ptr<float>()[j]);
      a[s + j] = one_bf16(state_mask.data_ptr<float>()[j]);
    }
    gemm16(a.data(), Ks_, b16(w_[8]), Ks_, D_, acc, D_);
    const float* sb = w_[9].data_ptr<float>();
    for (int j = 0; j < D_; ++j) out[j] = acc[j] + sb[j];
    out += D_;
    std::copy_n(w_[10].data_ptr<float>() + embodiment * D_, D_, out);
    out += D_;
    if (query_) {
      std::copy_n(w_[11].data_ptr<float>(), D_, out);
      out += D_;
    }
    const float *emb = w_[12].data_ptr<float>(), *pos = w_[13].data_ptr<float>();
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < D_; ++j) out[static_cast<size_t>(i) * D_ + j] = emb[ids[i] * D_ + j] + pos[i * D_ + j];
  }

  std::vector<torch::Tensor> w_;
  float text_eps_;
  int S_, half_, Cp_, cameras_ = 0, history_ = 0, P_ = 0, D_ = 0, g_ = 0, Dt_ = 0, text_max_ = 0, Ks_ = 0, E_ = 0,
      V_ = 0;
  bool query_ = false;
};

}  // namespace

void bind_tokens(pybind11::module_& m) {
  pybind11::class_<Tokens>(m, "Tokens")
      .def(pybind11::init<std::vector<torch::Tensor>, double, int64_t, int64_t, int64_t>())
      .def("run", &Tokens::run, "one observation's prefix tokens (and a draft's embeddings)");
}
