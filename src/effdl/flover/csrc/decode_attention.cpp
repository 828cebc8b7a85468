// Decode attention over each row's live keys only: one query token per row, fp32, on CPU.
//
// Masked SDPA over a decode batch reads every row's keys and values up to the longest row, and on CPU that read
// is the cost. This kernel reads row b's first lengths[b] positions (the last `window` of them with a sliding
// window), two passes per (row, head): scores against the keys, then the softmax-weighted sum of the values.
//
// Given the step's new keys and values, it first writes them at position lengths[b] - 1, inside the task that
// then reads that row. Written by a separate scatter after the QKV projection has evicted the cache lines, those
// few hundred rows are as many cache misses in a row: 10-20% of a 32-row step on a 2-core Xeon. Here each miss
// overlaps with the streaming read of the row's older keys.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& lengths, int64_t window, double scale,
                               const c10::optional<torch::Tensor>& new_k, const c10::optional<torch::Tensor>& new_v) {
  // q (B, H, Dh) contiguous; k, v (B, K, S, Dh) with unit stride in Dh; lengths (B,) int64 in [1, S];
  // new_k, new_v (B, K, Dh) contiguous, or none.
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), K = k.size(1);
  const int64_t heads_per_kv = H / K;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float* nkp = new_k ? new_k->data_ptr<float>() : nullptr;
  const float* nvp = new_v ? new_v->data_ptr<float>() : nullptr;
  const int64_t* lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vs = v.stride(2);
  const float fscale = static_cast<float>(scale);
  // one task per (row, kv head): it alone writes that head's new key and value, then serves its query heads
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / K, kv_head = task % K, n = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      float* keys = kp + b * kb + kv_head * kh;
      float* values = vp + b * vb + kv_head * vh;
      if (nkp != nullptr) {
        std::copy_n(nkp + task * Dh, Dh, keys + (n - 1) * ks);
        std::copy_n(nvp + task * Dh, Dh, values + (n - 1) * vs);
      }
      scores.resize(n - first);
      for (int64_t i = b * H + kv_head * heads_per_kv; i < b * H + (kv_head + 1) * heads_per_kv; ++i) {
        const float* qi = qp + i * Dh;
        float top = -INFINITY;
        for (int64_t j = first; j < n; ++j) {
          const float* kj = keys + j * ks;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < Dh; ++d) s += qi[d] * kj[d];
          s *= fscale;
          scores[j - first] = s;
          top = std::max(top, s);
        }
        float total = 0.f;
        for (auto& s : scores) {
          s = std::exp(s - top);
          total += s;
        }
        float* oi = op + i * Dh;
        std::fill(oi, oi + Dh, 0.f);
        for (int64_t j = first; j < n; ++j) {
          const float* vj = values + j * vs;
          const float p = scores[j - first];
#pragma omp simd
          for (int64_t d = 0; d < Dh; ++d) oi[d] += p * vj[d];
        }
        const float inv = 1.f / total;
        for (int64_t d = 0; d < Dh; ++d) oi[d] *= inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over each row's live keys (fp32, CPU)");
}
