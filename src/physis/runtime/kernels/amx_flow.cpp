// The action expert's whole flow loop as one function on AMX tiles (see physis/runtime/fused.py).
//
// At batch 1 a flow step is ~16 tokens through a few small layers: a few microseconds of arithmetic behind tens
// of library calls, each with its own dispatch, allocation and thread hand-off. Here one call runs every step
// of a chunk on one core: matmuls as AMX bf16 tile products against weights packed once, activations kept in
// float32 and rounded to bf16 only where they enter a matmul, attention over the cached context with the action
// tokens' keys and values packed in place per step.
#include <torch/extension.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int T = 16;       // action tokens per chunk: one tile of rows
constexpr int BLOCK = 512;  // bf16 values in one packed B tile (16 rows x 32)

using bf16 = uint16_t;

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool request_amx() {
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // 2^t = 2^n 2^f, f in [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 1 / x to float32 precision: the 14-bit estimate and one Newton step (a division is several times slower)
inline __m512 recip(__m512 x) {
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.f)));
}

// float32 -> bf16 (round to nearest even), n a multiple of 16
inline void to_bf16(const float* src, bf16* dst, int n) {
  for (int i = 0; i < n; i += 16) {
    __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<__m256i&>(h));
  }
}

// 32 float32 -> 32 bf16 in one register
inline __m512i bf16x32(const float* src) {
  __m256bh lo = _mm512_cvtneps_pbh(_mm512_loadu_ps(src)), hi = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(reinterpret_cast<__m256i&>(lo)), reinterpret_cast<__m256i&>(hi), 1);
}

// word indices that interleave two rows of 32 bf16: (a0 b0 a1 b1 .. a15 b15) and (a16 b16 .. a31 b31)
const __m512i INTERLEAVE_LO = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                               38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
const __m512i INTERLEAVE_HI = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23,
                                               54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);

inline bf16 one_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<bf16>(u >> 16);
}

// C (16 x N, float32, row stride ldc) = A (16 x K bf16, row stride lda) B, with B packed as [N/16][K/32] tiles.
void gemm16(const bf16* A, int lda, const bf16* B, int K, int N, float* C, int ldc) {
  const int kb_n = K / 32, nb_n = N / 16;
  int nb = 0;
  for (; nb + 4 <= nb_n; nb += 4) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const bf16* b0 = B + static_cast<size_t>(nb) * kb_n * BLOCK;
    const size_t s = static_cast<size_t>(kb_n) * BLOCK;  // one column of tiles
    for (int kb = 0; kb < kb_n; ++kb) {
      _tile_loadd(4, A + kb * 32, lda * 2);
      _tile_loadd(5, b0 + kb * BLOCK, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b0 + s + kb * BLOCK, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, b0 + 2 * s + kb * BLOCK, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b0 + 3 * s + kb * BLOCK, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, C + nb * 16, ldc * 4);
    _tile_stored(1, C + (nb + 1) * 16, ldc * 4);
    _tile_stored(2, C + (nb + 2) * 16, ldc * 4);
    _tile_stored(3, C + (nb + 3) * 16, ldc * 4);
  }
  for (; nb < nb_n; ++nb) {
    _tile_zero(0);
    const bf16* b0 = B + static_cast<size_t>(nb) * kb_n * BLOCK;
    for (int kb = 0; kb < kb_n; ++kb) {
      _tile_loadd(4, A + kb * 32, lda * 2);
      _tile_loadd(5, b0 + kb * BLOCK, 64);
      _tile_dpbf16ps(0, 4, 5);
    }
    _tile_stored(0, C + nb * 16, ldc * 4);
  }
}

// row-wise LayerNorm of x (16 x D float32) into bf16, D a multiple of 16
void layer_norm_bf16(const float* x, int D, const float* w, const float* b, float eps, bf16* out) {
  std::vector<float> row(D);
  for (int i = 0; i < T; ++i) {
    const float* xi = x + i * D;
    __m512 s = _mm512_setzero_ps();
    for (int j = 0; j < D; j += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xi + j));
    const float mean = _mm512_reduce_add_ps(s) / D;
    const __m512 m = _mm512_set1_ps(mean);
    __m512 v = _mm512_setzero_ps();
    for (int j = 0; j < D; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(xi + j), m);
      v = _mm512_fmadd_ps(d, d, v);
    }
    const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(v) / D + eps));
    for (int j = 0; j < D; j += 16) {
      const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xi + j), m), r);
      _mm512_storeu_ps(row.data() + j, _mm512_fmadd_ps(d, _mm512_loadu_ps(w + j), _mm512_loadu_ps(b + j)));
    }
    to_bf16(row.data(), out + i * D, D);
  }
}

// Key rows (n x 32 float32, row stride ld) as the B tiles of S = Q K^T from `out` on: B[k=d][n=key], tile j/16
// holding key j in column j % 16; a token's 16 d-pairs (32-bit words) go to words r * 16 + j % 16 (a scatter).
void pack_key_rows(const float* k, int n, bf16* out, int ld = 32) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(16));
  for (int j = 0; j < n; ++j)
    _mm512_i32scatter_epi32(reinterpret_cast<int*>(out + (j / 16) * BLOCK) + j % 16, rows, bf16x32(k + j * ld), 4);
}

// Value rows (n x 32 float32, row stride ld) for keys first .. first + n as the B tiles of O = P V in `out`
// (2, nkp/32, 512): B[k=key][n=d], keys 2r and 2r + 1 interleaved, d 0..15 in the first column of tiles.
void pack_value_rows(const float* v, int n, int ld, int nkp, bf16* out, int first = 0) {
  static const float zero[32] = {};
  for (int j = 0; j < n; j += 2) {
    const int key = first + j;
    const __m512i a = bf16x32(v + j * ld), b = bf16x32(j + 1 < n ? v + (j + 1) * ld : zero);
    bf16* row = out + (key / 32) * BLOCK + ((key % 32) / 2) * 32;
    _mm512_storeu_si512(row, _mm512_permutex2var_epi16(a, INTERLEAVE_LO, b));
    _mm512_storeu_si512(row + (nkp / 32) * BLOCK, _mm512_permutex2var_epi16(a, INTERLEAVE_HI, b));
  }
}

struct Layer {
  const float *ln1_w, *ln1_b, *qkv_b, *proj_b, *ln2_w, *ln2_b, *fc1_b, *fc2_b;
  const bf16 *qkv, *proj, *fc1, *fc2;
  float eps1, eps2;
};

const float* f32(const torch::Tensor& t) { return t.data_ptr<float>(); }
const bf16* b16(const torch::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

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
  std::vector<Layer> layers(L);
  for (int l = 0; l < L; ++l) {
    const auto* w = &weights[12 * l];
    layers[l] = {f32(w[0]), f32(w[1]), f32(w[3]), f32(w[5]), f32(w[6]), f32(w[7]), f32(w[9]), f32(w[11]),
                 b16(w[2]), b16(w[4]), b16(w[8]), b16(w[10]),
                 static_cast<float>(eps[2 * l]), static_cast<float>(eps[2 * l + 1])};
  }
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
      layer_norm_bf16(h.data(), D, ly.ln1_w, ly.ln1_b, ly.eps1, a16.data());
      float* qkv = tmp.data();  // (16, 3, heads, 32)
      gemm16(a16.data(), D, ly.qkv, D, 3 * W, qkv, 3 * W);
      for (int i = 0; i < T; ++i)
        for (int j = 0; j < 3 * W; j += 16)
          _mm512_storeu_ps(qkv + i * 3 * W + j, _mm512_add_ps(_mm512_loadu_ps(qkv + i * 3 * W + j),
                                                             _mm512_loadu_ps(ly.qkv_b + j)));
      for (int hd = 0; hd < heads; ++hd) {
        // this step's keys: one tile of 16 keys at block ctx/16; values: the first half of block ctx/32
        bf16* kp = kpack[l].data() + (static_cast<size_t>(hd) * (nkp / 16) + ctx / 16) * BLOCK;
        bf16* vp = vpack[l].data() + static_cast<size_t>(hd) * (nkp / 32) * 2 * BLOCK;  // (2, nkp/32, 512)
        pack_key_rows(qkv + W + hd * 32, T, kp, 3 * W);
        pack_value_rows(qkv + 2 * W + hd * 32, T, 3 * W, nkp, vp, ctx);
        const __m512 sc = _mm512_set1_ps(scale);
        for (int i = 0; i < T; ++i) {
          const float* qr = qkv + i * 3 * W + hd * 32;
          __m256bh lo = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(qr), sc));
          __m256bh hi = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(qr + 16), sc));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16.data() + i * 32), reinterpret_cast<__m256i&>(lo));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16.data() + i * 32 + 16), reinterpret_cast<__m256i&>(hi));
        }
        // scores over the context and the action tokens (the last 16 slots are padding, never attended)
        const int nk = ctx + 16;
        gemm16(q16.data(), 32, kpack[l].data() + static_cast<size_t>(hd) * (nkp / 16) * BLOCK, 32, nk,
               scores.data(), nkp);
        // softmax without its division: P = exp(s - max) in bf16, and each output row scaled by 1 / sum after
        float inv[T];
        for (int i = 0; i < T; ++i) {
          float* s = scores.data() + i * nkp;
          __m512 mx = _mm512_set1_ps(-INFINITY);
          for (int j = 0; j < nk; j += 16) {
            const __m512 z = _mm512_add_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(kbias.data() + j));
            _mm512_storeu_ps(s + j, z);
            mx = _mm512_max_ps(mx, z);
          }
          const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
          __m512 sum = _mm512_setzero_ps();
          bf16* p = p16.data() + i * nkp;
          for (int j = 0; j < nk; j += 16) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
            sum = _mm512_add_ps(sum, e);
            __m256bh eh = _mm512_cvtneps_pbh(e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), reinterpret_cast<__m256i&>(eh));
          }
          std::fill(p + nk, p + nkp, 0);
          inv[i] = 1.f / _mm512_reduce_add_ps(sum);
        }
        float* o = att.data() + hd * 32;
        gemm16(p16.data(), nkp, vpack[l].data() + static_cast<size_t>(hd) * (nkp / 32) * 2 * BLOCK, nkp, 32, o, W);
        for (int i = 0; i < T; ++i) {
          const __m512 r = _mm512_set1_ps(inv[i]);
          _mm512_storeu_ps(o + i * W, _mm512_mul_ps(_mm512_loadu_ps(o + i * W), r));
          _mm512_storeu_ps(o + i * W + 16, _mm512_mul_ps(_mm512_loadu_ps(o + i * W + 16), r));
        }
      }
      to_bf16(att.data(), a16.data(), T * W);
      gemm16(a16.data(), W, ly.proj, W, D, tmp.data(), D);
      for (int k = 0; k < T * D; k += 16) {
        const __m512 r = _mm512_add_ps(_mm512_loadu_ps(tmp.data() + k), _mm512_loadu_ps(ly.proj_b + k % D));
        _mm512_storeu_ps(h.data() + k, _mm512_add_ps(_mm512_loadu_ps(h.data() + k), r));
      }
      layer_norm_bf16(h.data(), D, ly.ln2_w, ly.ln2_b, ly.eps2, a16.data());
      gemm16(a16.data(), D, ly.fc1, D, H, tmp.data(), H);
      const __m512 c = _mm512_set1_ps(0.7978845608028654f), c3 = _mm512_set1_ps(0.044715f);
      for (int k = 0; k < T * H; k += 16) {  // GELU, tanh form: 0.5 z (1 + tanh(u)) = z / (1 + exp(-2u))
        const __m512 z = _mm512_add_ps(_mm512_loadu_ps(tmp.data() + k), _mm512_loadu_ps(ly.fc1_b + k % H));
        const __m512 u = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(c3, z), _mm512_mul_ps(z, z), z));
        const __m512 e = exp512(_mm512_mul_ps(_mm512_set1_ps(-2.f), u));
        _mm512_storeu_ps(tmp.data() + k, _mm512_mul_ps(z, recip(_mm512_add_ps(_mm512_set1_ps(1.f), e))));
      }
      to_bf16(tmp.data(), a16.data(), T * H);
      gemm16(a16.data(), H, ly.fc2, H, D, tmp.data(), D);
      for (int k = 0; k < T * D; k += 16) {
        const __m512 r = _mm512_add_ps(_mm512_loadu_ps(tmp.data() + k), _mm512_loadu_ps(ly.fc2_b + k % D));
        _mm512_storeu_ps(h.data() + k, _mm512_add_ps(_mm512_loadu_ps(h.data() + k), r));
      }
    }
    // velocity = action_out(norm(h)); one Euler step that steers the clean estimate toward the target
    layer_norm_bf16(h.data(), D, norm_w, norm_b, norm_eps, a16.data());
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("amx_flow", &amx_flow, "the action expert's flow loop on AMX"); }
