// Building blocks of physis's CPU kernels (amx_tokens.cpp, amx_trunk.cpp, amx_flow.cpp): bf16 tile products against
// weights packed once, on AMX (run, or emulated in C++ for tests) or AVX-512 BF16, and the float32 vector pieces
// around them (LayerNorm, GELU, softmax rows, an exp of our own).
#pragma once

#include <torch/extension.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace amx {

constexpr int T = 16;       // rows of one A or C tile
constexpr int BLOCK = 512;  // bf16 values in one packed B tile (16 rows x 32)

using bf16 = uint16_t;

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether the tile products run on AMX (true) or on AVX-512 BF16 dot products (false: CPUs without AMX, such as
// AMD's Zen 4 and later). Both read the same packed B tiles. The loader sets it once (`set_isa`) from what the CPU
// has, before any kernel runs.
inline bool& use_amx() {
  static bool on = true;
  return on;
}

// Whether AMX's tile instructions are computed in plain C++ (`EmulatedTiles`) rather than run: the AMX path, every
// tile load, product and store of it, checked on a CPU without AMX (slowly; `set_isa("amx-emulated")`)
inline bool& emulate_amx() {
  static bool on = false;
  return on;
}

// whether this thread may run the tile products: AMX needs the kernel's leave to use its tile state
inline bool tiles_ready() {
  if (!use_amx() || emulate_amx()) return true;
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

// every tile 16 x 64 bytes (the emulated tiles' one shape); per thread, before its first tile product
inline void configure_tiles() {
  if (!use_amx() || emulate_amx()) return;
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

// per thread, after its last tile product
inline void release_tiles() {
  if (use_amx() && !emulate_amx()) _tile_release();
}

// One kernel thread's state for the length of a parallel region: its tiles configured, and denormals flushed (the
// softmax weights of masked keys and GELU's far tails fall there, each a microcode assist); both undone at the end
class ThreadTiles {
 public:
  ThreadTiles() : csr_(_mm_getcsr()) {
    configure_tiles();
    _mm_setcsr(csr_ | 0x8040);
  }
  ~ThreadTiles() {
    release_tiles();
    _mm_setcsr(csr_);
  }
  ThreadTiles(const ThreadTiles&) = delete;
  ThreadTiles& operator=(const ThreadTiles&) = delete;

 private:
  unsigned csr_;
};

constexpr float LOG2E = 1.44269504088896341f;

// 2^x, a degree-3 fit on the fraction: relative error under 8e-5, far below the bf16 rounding that everything it
// feeds goes through (softmax weights into P V, activations into the next matmul). With `clamp` (x from -126 up)
// x = -inf gives 2^-126, as good as 0 here; without it x must be finite. Overflow gives inf.
template <bool clamp = true>
inline __m512 exp2_fast(__m512 x) {
  if (clamp) x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // 2^x = 2^n 2^f, f in [-0.5, 0.5]
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.05508876703270117f), f, _mm512_set1_ps(0.242604655908052f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932762833317916f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999289048197653f));
  return _mm512_scalef_ps(p, n);
}

// z / (1 + 2^(k z)): SiLU with k = -log2(e), and the tanh form of GELU with k = -2 log2(e) sqrt(2 / pi) (1 +
// 0.044715 z^2), for a result that is rounded to bf16 next: the reciprocal's 14-bit estimate is enough, and an
// overflowing 2^ gives z * 0 rather than a NaN
inline __m512 z_sigmoid(__m512 z, __m512 kz) {
  const __m512 e = exp2_fast<false>(kz);
  return _mm512_mul_ps(z, _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.f), e)));
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
inline const __m512i INTERLEAVE_LO = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
inline const __m512i INTERLEAVE_HI = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                                      55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);

inline bf16 one_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<bf16>(u >> 16);
}

// Rows i0 .. i0 + 8 of C = A B on AVX-512 BF16, for NC consecutive column tiles of B from B0 (s bf16 apart): row r
// of a packed tile (the 16 columns' k-pair r) is one register, against which each row of A broadcasts its own
// k-pair; 8 x NC accumulators.
template <int NC>
inline void dot_rows8(const bf16* A, int lda, const bf16* B0, size_t s, int kb_n, float* C, int ldc) {
  __m512 acc[8][NC];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
#pragma GCC unroll 3
    for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int kb = 0; kb < kb_n; ++kb) {
    const bf16 *a = A + kb * 32, *b = B0 + kb * BLOCK;
#pragma GCC unroll 2
    for (int r = 0; r < 16; ++r) {
      __m512bh bc[NC];
#pragma GCC unroll 3
      for (int c = 0; c < NC; ++c) bc[c] = (__m512bh)_mm512_loadu_si512(b + c * s + r * 32);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        int32_t pair;
        std::memcpy(&pair, a + i * lda + 2 * r, 4);
        const __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 3
        for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], ai, bc[c]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
#pragma GCC unroll 3
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(C + i * ldc + c * 16, acc[i][c]);
}

// gemm16 without AMX: column tiles three at a time, each half of the rows in turn
inline void gemm16_avx512(const bf16* A, int lda, const bf16* B, int K, int N, float* C, int ldc, int kb_stride) {
  const int kb_n = K / 32, nb_n = N / 16;
  const size_t s = static_cast<size_t>(kb_stride) * BLOCK;  // one column of tiles
  for (int nb = 0; nb < nb_n; nb += 3) {
    const bf16* b0 = B + nb * s;
    for (int half = 0; half < 16; half += 8) {
      const bf16* a = A + half * lda;
      float* c = C + half * ldc + nb * 16;
      switch (std::min(3, nb_n - nb)) {
        case 3: dot_rows8<3>(a, lda, b0, s, kb_n, c, ldc); break;
        case 2: dot_rows8<2>(a, lda, b0, s, kb_n, c, ldc); break;
        default: dot_rows8<1>(a, lda, b0, s, kb_n, c, ldc);
      }
    }
  }
}

// AMX's tile instructions in plain C++, on each thread's own eight tiles of 16 rows x 64 bytes, in the order of
// operations the instruction set reference gives (a bf16 product is exact in float32, so each += rounds once, as
// the hardware's does; denormals flush under `ThreadTiles`, as the hardware flushes them)
struct EmulatedTiles {
  using Tile = uint8_t[16][64];
  static Tile& tile(int t) {
    alignas(64) static thread_local uint8_t tiles[8][16][64];
    return tiles[t];
  }
  static void zero(int t) { std::memset(tile(t), 0, sizeof(Tile)); }
  static void load(int t, const void* base, long stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(tile(t)[r], static_cast<const uint8_t*>(base) + r * stride, 64);
  }
  static void store(int t, void* base, long stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, tile(t)[r], 64);
  }
  // C (16 x 16 float32) += A (16 rows x 16 k-pairs) B (16 k-pairs x 16 columns x 2)
  static void dpbf16ps(int c, int a, int b) {
    float C[16][16];
    bf16 A[16][32], B[16][32];
    std::memcpy(C, tile(c), sizeof(C));
    std::memcpy(A, tile(a), sizeof(A));
    std::memcpy(B, tile(b), sizeof(B));
    const auto f = [](bf16 v) {
      const uint32_t u = static_cast<uint32_t>(v) << 16;
      float x;
      std::memcpy(&x, &u, 4);
      return x;
    };
    for (int m = 0; m < 16; ++m)
      for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 16; ++n) {
          C[m][n] += f(A[m][2 * k]) * f(B[k][2 * n]);
          C[m][n] += f(A[m][2 * k + 1]) * f(B[k][2 * n + 1]);
        }
    std::memcpy(tile(c), C, sizeof(C));
  }
};

// gemm16 on AMX's tiles, run (emulated = false) or computed by `EmulatedTiles`. The tile instructions take their
// tile's number as a literal, hence the macros.
#define TILE_ZERO(t) \
  if constexpr (emulated) EmulatedTiles::zero(t); \
  else _tile_zero(t)
#define TILE_LOAD(t, base, stride) \
  if constexpr (emulated) EmulatedTiles::load(t, base, stride); \
  else _tile_loadd(t, base, stride)
#define TILE_STORE(t, base, stride) \
  if constexpr (emulated) EmulatedTiles::store(t, base, stride); \
  else _tile_stored(t, base, stride)
#define TILE_DOT(c, a, b) \
  if constexpr (emulated) EmulatedTiles::dpbf16ps(c, a, b); \
  else _tile_dpbf16ps(c, a, b)

template <bool emulated>
inline void gemm16_amx(const bf16* A, int lda, const bf16* B, int K, int N, float* C, int ldc, int kb_stride) {
  const int kb_n = K / 32, nb_n = N / 16;
  const size_t s = static_cast<size_t>(kb_stride) * BLOCK;  // one column of tiles
  int nb = 0;
  for (; nb + 4 <= nb_n; nb += 4) {
    TILE_ZERO(0);
    TILE_ZERO(1);
    TILE_ZERO(2);
    TILE_ZERO(3);
    const bf16* b0 = B + nb * s;
    for (int kb = 0; kb < kb_n; ++kb) {
      TILE_LOAD(4, A + kb * 32, lda * 2);
      TILE_LOAD(5, b0 + kb * BLOCK, 64);
      TILE_DOT(0, 4, 5);
      TILE_LOAD(6, b0 + s + kb * BLOCK, 64);
      TILE_DOT(1, 4, 6);
      TILE_LOAD(7, b0 + 2 * s + kb * BLOCK, 64);
      TILE_DOT(2, 4, 7);
      TILE_LOAD(5, b0 + 3 * s + kb * BLOCK, 64);
      TILE_DOT(3, 4, 5);
    }
    TILE_STORE(0, C + nb * 16, ldc * 4);
    TILE_STORE(1, C + (nb + 1) * 16, ldc * 4);
    TILE_STORE(2, C + (nb + 2) * 16, ldc * 4);
    TILE_STORE(3, C + (nb + 3) * 16, ldc * 4);
  }
  for (; nb < nb_n; ++nb) {
    TILE_ZERO(0);
    const bf16* b0 = B + nb * s;
    for (int kb = 0; kb < kb_n; ++kb) {
      TILE_LOAD(4, A + kb * 32, lda * 2);
      TILE_LOAD(5, b0 + kb * BLOCK, 64);
      TILE_DOT(0, 4, 5);
    }
    TILE_STORE(0, C + nb * 16, ldc * 4);
  }
}

#undef TILE_ZERO
#undef TILE_LOAD
#undef TILE_STORE
#undef TILE_DOT

// C (16 x N, float32, row stride ldc) = A (16 x K bf16, row stride lda) B, with B packed as [N/16][K/32] tiles.
// With kb_stride (a column of B's tiles, default K/32) B may be a slice of a longer K: its first tile, and the rows
// of A that meet it.
inline void gemm16(const bf16* A, int lda, const bf16* B, int K, int N, float* C, int ldc, int kb_stride = 0) {
  kb_stride = kb_stride ? kb_stride : K / 32;
  if (!use_amx()) return gemm16_avx512(A, lda, B, K, N, C, ldc, kb_stride);
  if (emulate_amx()) return gemm16_amx<true>(A, lda, B, K, N, C, ldc, kb_stride);
  gemm16_amx<false>(A, lda, B, K, N, C, ldc, kb_stride);
}

// C = A B over `tiles` row tiles of 16 (rows of A and C consecutive). (Two row tiles at a time, each weight tile
// loaded serving 32 rows, measured no faster: the tile products set the pace, not the weights' traffic.)
inline void gemm_rows(const bf16* A, int lda, int tiles, const bf16* B, int K, int N, float* C, int ldc) {
  for (int r = 0; r < tiles; ++r) gemm16(A + r * 16 * lda, lda, B, K, N, C + r * 16 * ldc, ldc);
}

// row-wise LayerNorm of x (rows x D float32) into bf16, D a multiple of 16 (a row is in L1 after its first pass)
inline void layer_norm_bf16(const float* x, int rows, int D, const float* w, const float* b, float eps, bf16* out) {
  for (int i = 0; i < rows; ++i) {
    const float* xi = x + static_cast<size_t>(i) * D;
    __m512 s = _mm512_setzero_ps();
    for (int j = 0; j < D; j += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xi + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_add_ps(s) / D);
    __m512 v = _mm512_setzero_ps();
    for (int j = 0; j < D; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(xi + j), m);
      v = _mm512_fmadd_ps(d, d, v);
    }
    const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(v) / D + eps));
    bf16* oi = out + static_cast<size_t>(i) * D;
    for (int j = 0; j < D; j += 16) {
      const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xi + j), m), r);
      __m256bh h = _mm512_cvtneps_pbh(_mm512_fmadd_ps(d, _mm512_loadu_ps(w + j), _mm512_loadu_ps(b + j)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(oi + j), reinterpret_cast<__m256i&>(h));
    }
  }
}

// y (rows x N, row stride ld, default N) += bias (N); N a multiple of 16
inline void add_bias(float* y, int rows, int N, const float* bias, int ld = 0) {
  ld = ld ? ld : N;
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < N; j += 16) {
      float* p = y + static_cast<size_t>(i) * ld + j;
      _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(bias + j)));
    }
}

// the residual stream h (rows x N) += y + bias
inline void add_residual(float* h, const float* y, int rows, int N, const float* bias) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < N; j += 16) {
      const size_t k = static_cast<size_t>(i) * N + j;
      const __m512 r = _mm512_add_ps(_mm512_loadu_ps(y + k), _mm512_loadu_ps(bias + j));
      _mm512_storeu_ps(h + k, _mm512_add_ps(_mm512_loadu_ps(h + k), r));
    }
}

// out (bf16) = GELU(y + bias) (rows x N float32), the tanh form: 0.5 z (1 + tanh(u)) = z / (1 + exp(-2u)), u =
// sqrt(2 / pi) (z + 0.044715 z^3)
inline void bias_gelu_bf16(const float* y, int rows, int N, const float* bias, bf16* out) {
  const float k = -2.f * LOG2E * 0.7978845608028654f;
  const __m512 k1 = _mm512_set1_ps(k), k3 = _mm512_set1_ps(k * 0.044715f);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < N; j += 16) {
      const size_t at = static_cast<size_t>(i) * N + j;
      const __m512 z = _mm512_add_ps(_mm512_loadu_ps(y + at), _mm512_loadu_ps(bias + j));
      __m256bh h = _mm512_cvtneps_pbh(z_sigmoid(z, _mm512_mul_ps(z, _mm512_fmadd_ps(k3, _mm512_mul_ps(z, z), k1))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at), reinterpret_cast<__m256i&>(h));
    }
}

// A head's 16 queries (rows of 32 float32, row stride ld) times `scale`, as one bf16 A tile (16 x 32). With
// scale = log2(e) / sqrt(32) the scores come out in base 2, as `softmax_row` takes them.
inline void pack_queries(const float* q, int ld, float scale, bf16* out) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int i = 0; i < T; ++i) {
    __m256bh lo = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(q + i * ld), sc));
    __m256bh hi = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(q + i * ld + 16), sc));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * 32), reinterpret_cast<__m256i&>(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * 32 + 16), reinterpret_cast<__m256i&>(hi));
  }
}

// a row of per-key biases (0 where a key may be attended, -inf where not; n a multiple of 16) as masks of 16 keys
inline std::vector<__mmask16> key_masks(const float* bias, int n) {
  std::vector<__mmask16> masks(n / 16);
  for (int j = 0; j < n; j += 16)
    masks[j / 16] = _mm512_cmp_ps_mask(_mm512_loadu_ps(bias + j), _mm512_setzero_ps(), _CMP_EQ_OQ);
  return masks;
}

// One row of softmax without its division: s (nk scores in base 2) over the keys set in `valid` (16 a mask) -> p =
// 2^(s - max) in bf16, zero for the others and from nk to nkp; returns 1 / sum, by which the row's output is scaled
// after P V. (Masking rather than adding -inf keeps the scores finite and saves a pass over them.)
inline float softmax_row(const float* s, const __mmask16* valid, int nk, int nkp, bf16* p) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < nk; j += 16) mx = _mm512_mask_max_ps(mx, valid[j / 16], mx, _mm512_loadu_ps(s + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < nk; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(valid[j / 16], exp2_fast<false>(_mm512_sub_ps(_mm512_loadu_ps(s + j), m)));
    sum = _mm512_add_ps(sum, e);
    __m256bh eh = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), reinterpret_cast<__m256i&>(eh));
  }
  std::fill(p + nk, p + nkp, 0);
  return 1.f / _mm512_reduce_add_ps(sum);
}

// o (16 rows of 32, row stride ld) *= inv[row]
inline void scale_rows(float* o, int ld, const float* inv) {
  for (int i = 0; i < T; ++i) {
    const __m512 r = _mm512_set1_ps(inv[i]);
    _mm512_storeu_ps(o + i * ld, _mm512_mul_ps(_mm512_loadu_ps(o + i * ld), r));
    _mm512_storeu_ps(o + i * ld + 16, _mm512_mul_ps(_mm512_loadu_ps(o + i * ld + 16), r));
  }
}

// Key rows (n x 32 float32, row stride ld) as the B tiles of S = Q K^T from `out` on: B[k=d][n=key], tile j/16
// holding key j in column j % 16; a token's 16 d-pairs (32-bit words) go to words r * 16 + j % 16 (a scatter).
inline void pack_key_rows(const float* k, int n, bf16* out, int ld = 32) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(16));
  for (int j = 0; j < n; ++j)
    _mm512_i32scatter_epi32(reinterpret_cast<int*>(out + (j / 16) * BLOCK) + j % 16, rows, bf16x32(k + j * ld), 4);
}

// Value rows (n x 32 float32, row stride ld) for keys first .. first + n as the B tiles of O = P V in `out`
// (2, nkp/32, 512): B[k=key][n=d], keys 2r and 2r + 1 interleaved, d 0..15 in the first column of tiles.
inline void pack_value_rows(const float* v, int n, int ld, int nkp, bf16* out, int first = 0) {
  static const float zero[32] = {};
  for (int j = 0; j < n; j += 2) {
    const int key = first + j;
    const __m512i a = bf16x32(v + j * ld), b = bf16x32(j + 1 < n ? v + (j + 1) * ld : zero);
    bf16* row = out + (key / 32) * BLOCK + ((key % 32) / 2) * 32;
    _mm512_storeu_si512(row, _mm512_permutex2var_epi16(a, INTERLEAVE_LO, b));
    _mm512_storeu_si512(row + (nkp / 32) * BLOCK, _mm512_permutex2var_epi16(a, INTERLEAVE_HI, b));
  }
}

// One pre-norm transformer block's weights: matmul weights as packed bf16 tiles, the rest float32
struct Layer {
  const float *ln1_w, *ln1_b, *qkv_b, *proj_b, *ln2_w, *ln2_b, *fc1_b, *fc2_b;
  const bf16 *qkv, *proj, *fc1, *fc2;
  float eps1, eps2;
};

inline const float* f32(const torch::Tensor& t) { return t.data_ptr<float>(); }
inline const bf16* b16(const torch::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }

// layers from weights laid out per layer as [ln1_w, ln1_b, qkv, qkv_b, proj, proj_b, ln2_w, ln2_b, fc1, fc1_b, fc2,
// fc2_b], and eps as [norm1, norm2] per layer
inline std::vector<Layer> read_layers(const std::vector<torch::Tensor>& weights, const std::vector<double>& eps,
                                      int L) {
  std::vector<Layer> layers(L);
  for (int l = 0; l < L; ++l) {
    const auto* w = &weights[12 * l];
    layers[l] = {f32(w[0]), f32(w[1]), f32(w[3]), f32(w[5]), f32(w[6]), f32(w[7]), f32(w[9]), f32(w[11]),
                 b16(w[2]), b16(w[4]), b16(w[8]), b16(w[10]),
                 static_cast<float>(eps[2 * l]), static_cast<float>(eps[2 * l + 1])};
  }
  return layers;
}

}  // namespace amx
