// The trunk over a chunk's prefix (and a subtask draft) as one function on bf16 tiles (see physis/runtime/fused.py).
//
// At batch 1 the prefix is ~170 tokens through a few blocks: a few hundred MFLOP that AMX does in a fraction of a
// millisecond, behind some hundred library and generated-kernel calls. Here one call runs every block: each thread
// takes a share of the tokens (whole tiles of 16 rows) through LayerNorm, the qkv matmul and into the shared packed
// keys and values; after one barrier per block it runs its tokens' attention, projection and MLP, which need no one
// else's rows.
#include <omp.h>

#include <algorithm>

#include "amx.h"

using namespace amx;

namespace {

constexpr float NEG_INF = -INFINITY;

class Trunk {
 public:
  // weights: 12 per block (as amx::read_layers), then [norm_w, norm_b, out (packed), out_b (padded to the packed
  // width)], the last two the subtask head; eps: 2 per block, then the final norm's
  Trunk(std::vector<torch::Tensor> weights, std::vector<double> eps, int64_t heads, int64_t head_dim, int64_t width,
        int64_t hidden, int64_t vocab)
      : weights_(std::move(weights)), heads_(heads), D_(width), H_(hidden), V_(vocab) {
    TORCH_CHECK(head_dim == 32, "amx_trunk: heads 32 wide expected");
    TORCH_CHECK(D_ % 32 == 0 && H_ % 32 == 0, "amx_trunk: widths must be multiples of 32");
    L_ = (static_cast<int>(weights_.size()) - 4) / 12;
    TORCH_CHECK(L_ >= 1 && static_cast<int>(weights_.size()) == 12 * L_ + 4, "amx_trunk: wrong number of weights");
    W_ = heads_ * 32;
    layers_ = read_layers(weights_, eps, L_);
    const auto* top = &weights_[12 * L_];
    norm_w_ = f32(top[0]);
    norm_b_ = f32(top[1]);
    out_w_ = b16(top[2]);
    out_b_ = f32(top[3]);
    VO_ = static_cast<int>(top[3].size(0));
    norm_eps_ = static_cast<float>(eps[2 * L_]);
  }

  // x (N, D) float32: the prefix's p tokens, then n draft tokens (n may be 0); valid (p) bool, true where a prefix
  // key may be attended; draft (n) int64, the draft's ids. Prefix tokens attend to the valid prefix keys, draft
  // tokens also to the draft's tokens up to themselves. The last block runs only the draft's tokens on (the
  // prefix's last hidden states feed nothing an engine reads). Returns keys and values (L, 1, heads, N, 32) float32
  // (batch 1, as an engine's cache holds them), and for draft positions 0..n-2, as (1, n - 1), the greedy next token
  // (never pad_id or bos_id) and how far the draft's next token falls behind it: (best - logit) / max(|best|, 1).
  std::vector<torch::Tensor> run(torch::Tensor x, torch::Tensor valid, torch::Tensor draft, int64_t pad_id,
                                 int64_t bos_id, int64_t threads) const {
    TORCH_CHECK(tiles_ready(), "amx_trunk: the kernel could not enable AMX tiles on this CPU");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == D_ && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
                "amx_trunk: x must be contiguous float32 (N, width)");
    const int N = x.size(0), p = valid.size(0), n = N - p;
    TORCH_CHECK(n >= 0 && draft.size(0) == n, "amx_trunk: x holds the prefix and the draft's tokens");
    TORCH_CHECK(valid.scalar_type() == torch::kBool && valid.is_contiguous() &&
                    draft.scalar_type() == torch::kInt64 && draft.is_contiguous(),
                "amx_trunk: valid must be contiguous bool, draft contiguous int64");
    const int64_t* ids = draft.data_ptr<int64_t>();
    for (int i = 0; i < n; ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < V_, "amx_trunk: a draft id outside the vocabulary");
    const int tiles = (N + 15) / 16, Np = tiles * 16, nkp = (Np + 31) / 32 * 32;
    const int first_draft_tile = n > 0 ? p / 16 : tiles;  // the last block runs tiles from here on

    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    torch::Tensor keys = torch::empty({L_, 1, heads_, N, 32}, opts);
    torch::Tensor values = torch::empty({L_, 1, heads_, N, 32}, opts);
    std::vector<float> h(static_cast<size_t>(Np) * D_, 0.f);
    std::memcpy(h.data(), x.data_ptr<float>(), sizeof(float) * N * D_);
    // per-key bias rows: the prefix's (0 or -inf), and one per draft token (the prefix's, plus the draft up to it)
    std::vector<float> bias(static_cast<size_t>(1 + n) * nkp, NEG_INF);
    const bool* ok = valid.data_ptr<bool>();
    for (int j = 0; j < p; ++j) bias[j] = ok[j] ? 0.f : NEG_INF;
    for (int i = 0; i < n; ++i) {
      float* row = bias.data() + static_cast<size_t>(1 + i) * nkp;
      std::copy(bias.begin(), bias.begin() + p, row);
      std::fill(row + p, row + p + i + 1, 0.f);
    }
    const std::vector<__mmask16> masks = key_masks(bias.data(), (1 + n) * nkp);  // nkp / 16 a row
    // the blocks' keys and values as B tiles, two sets so a thread may pack block l + 1 while another still reads l
    const size_t kstride = static_cast<size_t>(nkp / 16) * BLOCK, vstride = static_cast<size_t>(nkp / 32) * 2 * BLOCK;
    std::vector<bf16> kpack(2 * heads_ * kstride, 0), vpack(2 * heads_ * vstride, 0);

    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();
      const ThreadTiles thread_tiles;
      const int t0 = tiles * tid / team, t1 = tiles * (tid + 1) / team, rows = (t1 - t0) * 16;
      // the last block's share of the draft's tiles, dealt from the last thread down: the first threads have the
      // fewer tokens when the tiles do not split evenly
      const int back = team - 1 - tid, d = tiles - first_draft_tile;
      const int d0 = first_draft_tile + d * back / team, d1 = first_draft_tile + d * (back + 1) / team;
      const size_t cap = std::max({rows, (d1 - d0) * 16, 16});
      std::vector<bf16> a16(cap * std::max({D_, W_, H_})), p16(16 * nkp), q16(16 * 32);
      std::vector<float> tmp(cap * std::max(3 * W_, H_)), att(cap * W_), scores(16 * nkp);
      const float scale = LOG2E / std::sqrt(32.f);  // scores in base 2, as softmax_row takes them
      for (int l = 0; l < L_; ++l) {
        const Layer& ly = layers_[l];
        bf16 *kp = kpack.data() + (l % 2) * heads_ * kstride, *vp = vpack.data() + (l % 2) * heads_ * vstride;
        // this thread's tokens: qkv, into the outputs and the packed keys and values
        if (rows > 0) {
          layer_norm_bf16(h.data() + static_cast<size_t>(t0) * 16 * D_, rows, D_, ly.ln1_w, ly.ln1_b, ly.eps1,
                          a16.data());
          gemm_rows(a16.data(), D_, t1 - t0, ly.qkv, D_, 3 * W_, tmp.data(), 3 * W_);
          add_bias(tmp.data(), rows, 3 * W_, ly.qkv_b);
          const int r0 = t0 * 16, mine = std::min(t1 * 16, N) - r0;
          for (int hd = 0; hd < heads_; ++hd) {
            const float *k = tmp.data() + W_ + hd * 32, *v = tmp.data() + 2 * W_ + hd * 32;
            float *ko = keys.data_ptr<float>() + ((static_cast<size_t>(l) * heads_ + hd) * N + r0) * 32,
                  *vo = values.data_ptr<float>() + ((static_cast<size_t>(l) * heads_ + hd) * N + r0) * 32;
            for (int i = 0; i < mine; ++i) {
              std::memcpy(ko + i * 32, k + static_cast<size_t>(i) * 3 * W_, 128);
              std::memcpy(vo + i * 32, v + static_cast<size_t>(i) * 3 * W_, 128);
            }
            pack_key_rows(k, mine, kp + hd * kstride + (r0 / 16) * BLOCK, 3 * W_);
            pack_value_rows(v, mine, 3 * W_, nkp, vp + hd * vstride, r0);
          }
        }
#pragma omp barrier
        // attention, projection and MLP of this thread's tokens (in the last block, of its share of the draft's)
        const int a0 = l == L_ - 1 ? d0 : t0, a1 = l == L_ - 1 ? d1 : t1;
        if (a1 <= a0) continue;
        // the last block's rows are not this thread's qkv rows: their queries come again from h
        const bool requery = a0 != t0 || a1 != t1;
        const int arows = (a1 - a0) * 16;
        float* hq = h.data() + static_cast<size_t>(a0) * 16 * D_;
        if (requery) {
          layer_norm_bf16(hq, arows, D_, ly.ln1_w, ly.ln1_b, ly.eps1, a16.data());
          gemm_rows(a16.data(), D_, a1 - a0, ly.qkv, D_, W_, tmp.data(), 3 * W_);  // the queries: qkv's first W
          add_bias(tmp.data(), arows, W_, ly.qkv_b, 3 * W_);                      // columns
        }
        for (int tile = a0; tile < a1; ++tile) {
          const int local = (tile - a0) * 16;
          const bool draft_rows = tile * 16 + 15 >= p && n > 0;
          const int nk = draft_rows ? Np : (p + 15) / 16 * 16;  // prefix tokens never read the draft's keys
          for (int hd = 0; hd < heads_; ++hd) {
            pack_queries(tmp.data() + static_cast<size_t>(local) * 3 * W_ + hd * 32, 3 * W_, scale, q16.data());
            gemm16(q16.data(), 32, kp + hd * kstride, 32, nk, scores.data(), nkp);
            float inv[16];
            for (int i = 0; i < 16; ++i) {
              const int row = tile * 16 + i;
              const __mmask16* b = masks.data() + (row >= p && row < N ? (1 + row - p) * (nkp / 16) : 0);
              inv[i] = softmax_row(scores.data() + i * nkp, b, nk, nkp, p16.data() + i * nkp);
            }
            float* o = att.data() + static_cast<size_t>(local) * W_ + hd * 32;
            gemm16(p16.data(), nkp, vp + hd * vstride, nkp, 32, o, W_);
            scale_rows(o, W_, inv);
          }
        }
        to_bf16(att.data(), a16.data(), arows * W_);
        gemm_rows(a16.data(), W_, a1 - a0, ly.proj, W_, D_, tmp.data(), D_);
        add_residual(hq, tmp.data(), arows, D_, ly.proj_b);
        layer_norm_bf16(hq, arows, D_, ly.ln2_w, ly.ln2_b, ly.eps2, a16.data());
        gemm_rows(a16.data(), D_, a1 - a0, ly.fc1, D_, H_, tmp.data(), H_);
        bias_gelu_bf16(tmp.data(), arows, H_, ly.fc1_b, a16.data());
        gemm_rows(a16.data(), H_, a1 - a0, ly.fc2, H_, D_, tmp.data(), D_);
        add_residual(hq, tmp.data(), arows, D_, ly.fc2_b);
      }
    }

    torch::Tensor pred = torch::zeros({1, std::max(n - 1, 0)}, torch::TensorOptions().dtype(torch::kInt64));
    torch::Tensor gap = torch::zeros({1, std::max(n - 1, 0)}, opts);
    if (n > 1) {  // the subtask head over the draft's tokens: out(norm(h))
      const int drows = (tiles - first_draft_tile) * 16;
      std::vector<bf16> a16(static_cast<size_t>(drows) * D_);
      std::vector<float> logits(static_cast<size_t>(drows) * VO_);
      configure_tiles();
      layer_norm_bf16(h.data() + static_cast<size_t>(first_draft_tile) * 16 * D_, drows, D_, norm_w_, norm_b_,
                      norm_eps_, a16.data());
      gemm_rows(a16.data(), D_, tiles - first_draft_tile, out_w_, D_, VO_, logits.data(), VO_);
      release_tiles();
      for (int i = 0; i + 1 < n; ++i) {
        const float* z = logits.data() + static_cast<size_t>(p + i - first_draft_tile * 16) * VO_;
        int best = -1;
        float top = NEG_INF;
        for (int v = 0; v < V_; ++v) {
          if (v == pad_id || v == bos_id) continue;
          const float s = z[v] + out_b_[v];
          if (best < 0 || s > top) best = v, top = s;
        }
        const int64_t next = ids[i + 1];
        const float chosen = (next == pad_id || next == bos_id) ? NEG_INF : z[next] + out_b_[next];
        pred.data_ptr<int64_t>()[i] = best;
        gap.data_ptr<float>()[i] = (top - chosen) / std::max(std::fabs(top), 1.f);
      }
    }
    return {keys, values, pred, gap};
  }

 private:
  std::vector<torch::Tensor> weights_;
  std::vector<Layer> layers_;
  int L_ = 0, heads_, D_, W_ = 0, H_, V_, VO_ = 0;
  const float *norm_w_ = nullptr, *norm_b_ = nullptr, *out_b_ = nullptr;
  const bf16* out_w_ = nullptr;
  float norm_eps_ = 0.f;
};

}  // namespace

torch::Tensor amx_flow(torch::Tensor noise, const std::vector<torch::Tensor>& weights, const std::vector<double>& eps,
                       std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, torch::Tensor valid,
                       torch::Tensor step_terms, torch::Tensor out_term, torch::Tensor target, torch::Tensor weight,
                       torch::Tensor action_mask, int64_t heads, int64_t head_dim, int64_t steps, int64_t threads,
                       int64_t split);

void bind_tokens(pybind11::module_& m);  // amx_tokens.cpp

namespace {

// The flow kernel with its weights held (amx_flow's weights and eps, heads, head_dim and split), so that a call
// converts only what changes per chunk, not some fifty weight tensors
class Flow {
 public:
  Flow(std::vector<torch::Tensor> weights, std::vector<double> eps, int64_t heads, int64_t head_dim, int64_t split)
      : weights_(std::move(weights)), eps_(std::move(eps)), heads_(heads), head_dim_(head_dim), split_(split) {}

  torch::Tensor run(torch::Tensor noise, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                    torch::Tensor valid, torch::Tensor step_terms, torch::Tensor out_term, torch::Tensor target,
                    torch::Tensor weight, torch::Tensor action_mask, int64_t steps, int64_t threads) const {
    return amx_flow(noise, weights_, eps_, std::move(keys), std::move(values), valid, step_terms, out_term, target,
                    weight, action_mask, heads_, head_dim_, steps, threads, split_);
  }

 private:
  std::vector<torch::Tensor> weights_;
  std::vector<double> eps_;
  int64_t heads_, head_dim_, split_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Flow>(m, "Flow")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<double>, int64_t, int64_t, int64_t>())
      .def("run", &Flow::run, "one chunk's flow loop");
  m.def(
      "set_isa",
      [](const std::string& isa) {
        TORCH_CHECK(isa == "amx" || isa == "avx512-bf16" || isa == "amx-emulated", "set_isa: no ISA ", isa);
        use_amx() = isa != "avx512-bf16";
        emulate_amx() = isa == "amx-emulated";
      },
      "what the tile products run on: amx, avx512-bf16, or amx-emulated (AMX's instructions in C++)");
  m.def(
      "isa", [] { return std::string(!use_amx() ? "avx512-bf16" : emulate_amx() ? "amx-emulated" : "amx"); },
      "what the tile products run on");
  pybind11::class_<Trunk>(m, "Trunk")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<double>, int64_t, int64_t, int64_t, int64_t,
                          int64_t>())
      .def("run", &Trunk::run, "the trunk over a prefix and a draft on AMX");
  bind_tokens(m);
}
