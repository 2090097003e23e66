// GroupNorm + SiLU on the CPU (math in sr3_kernels.h) for float32 / float16 / bfloat16 data in
// NCHW or NHWC, statistics accumulated in double, elementwise math in float.
//
// The reductions are cut into pieces fixed by the shape alone, so every thread count gives the
// same bits:
//   NCHW  each (batch, group) is one contiguous run of C/G * HW values, cut into chunks of
//         kChunk values; a chunk yields one partial (shifted sum, shifted sum of squares).
//   NHWC  each image is HW rows of C contiguous channels, cut into chunks of rows; a chunk
//         yields one partial per channel, so the inner loop runs along the contiguous channels.
// Everything is measured from the group's first value P (an input value, so x - P is exact
// for x near P): the partials accumulate d = (x - P) + (pre_bias[c] - pre_bias[first channel]),
// so the variance does not cancel, and the output is
//   out = silu(((x - P) - shift[c]) * scale[c] + bias[c]),  shift = mean - pre_bias[c] - P,
// which keeps full precision even when the mean is far from zero. Partials are summed in chunk
// order in double; the lane-wise sums inside a chunk piece are float (at most 16 values each).
// NCHW with at least two (batch, group) tasks per thread runs group by group, which reads each
// group the second time from cache; otherwise (channels_last, or few groups) it runs image by
// image, both sweeps over that image's chunks in parallel, so a single image with few groups
// still keeps every thread busy and the second sweep finds what the cache kept of the first.
// There the output sweep of image b also gathers image b + 1's partials, having asked for its
// cache lines a row ahead (channels_last): the output sweep is bound by silu's arithmetic and
// the partials by reading memory, so each hides the other (1.2-1.3x at (4, 64, 128, 128)).
// Channels_last images of fewer chunks than threads (a chunk is 16384 values) are swept as one
// batch instead, which is what keeps the threads busy there. None of this changes which values
// a partial holds nor the order partials are summed in.
// bfloat16 output on the AVX-512 BF16 path (sr3_kernels.h: Bf16Path, chosen at run time) is
// computed into a float block of kStoreBlock values and converted by the CPU's instruction; on
// the generic path, and for the other dtypes, each value is rounded inside the loop as before.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dtype.h"

namespace sr3::cpu {
namespace {

constexpr int64_t kChunk = 16384;        // values per partial
constexpr int64_t kMinParallel = 32768;  // below this many values a fork costs more than it saves
constexpr int64_t kTile = 16;            // NHWC channels accumulated together: one AVX-512 register
constexpr int64_t kBlock = 256;          // NCHW values per lane-wise float sum (16 per lane at AVX-512)
constexpr int64_t kBlockBytes = 16384;   // NHWC rows read for every channel tile while in L1 (half of it)
constexpr int64_t kStoreBlock = 256;     // float values converted to bfloat16 at once (1 KiB, in L1)

// Asks for the cache lines of [begin, begin + bytes) ahead of their use.
inline void prefetch(const void* begin, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(static_cast<const char*>(begin) + byte);
#else
  (void)begin;
  (void)bytes;
#endif
}

template <class Tr>
class GroupNormSilu {
 public:
  using T = typename Tr::Storage;

  explicit GroupNormSilu(const GroupNormSiluArgs& a)
      : a_(a), x_(static_cast<const T*>(a.x)), out_(static_cast<T*>(a.out)),
        per_group_(a.channels / a.groups), bf16_path_(bf16_path()) {
    if (a.channels_last) {
      rows_per_chunk_ = std::max<int64_t>(1, kChunk / a.channels);
      chunks_ = (a.spatial + rows_per_chunk_ - 1) / rows_per_chunk_;
      sums_.assign(a.batch * chunks_ * a.channels, 0.0);
    } else {
      chunks_ = (per_group_ * a.spatial + kChunk - 1) / kChunk;
      sums_.assign(a.batch * a.groups * chunks_, 0.0);
    }
    sumsqs_.assign(sums_.size(), 0.0);
    base_.resize(a.batch * a.channels);
    delta_.resize(a.batch * a.channels);
    shift_.resize(a.batch * a.channels);
    scale_.resize(a.batch * a.channels);
    bias_.resize(a.batch * a.channels);
  }

  void run(int threads) {
    set_bases();
    const int64_t groups = a_.batch * a_.groups;
    const bool parallel = threads > 1 && a_.batch * a_.channels * a_.spatial >= kMinParallel;
    if (!a_.channels_last && groups >= 2 * static_cast<int64_t>(threads)) {
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
      for (int64_t bg = 0; bg < groups; ++bg) {
        for (int64_t k = 0; k < chunks_; ++k) partial_nchw(bg, k);
        finalize(bg);
        for (int64_t k = 0; k < chunks_; ++k) apply_nchw(bg, k);
      }
      return;
    }
    if (a_.channels_last && chunks_ < threads) {
      // An image has fewer chunks than there are threads (few channels, small images), so an
      // image at a time would leave threads idle: each sweep covers the whole batch instead.
      const int64_t units = a_.batch * chunks_;
#pragma omp parallel num_threads(threads) if (parallel)
      {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) partial_nhwc(u / chunks_, u % chunks_);
#pragma omp for schedule(static)
        for (int64_t bg = 0; bg < groups; ++bg) finalize(bg);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) apply_nhwc<false>(u / chunks_, u % chunks_);
      }
      return;
    }
    const int64_t units = (a_.channels_last ? 1 : a_.groups) * chunks_;
    const auto partial = [&](int64_t b, int64_t u) {
      if (a_.channels_last) partial_nhwc(b, u);
      else partial_nchw(b * a_.groups + u / chunks_, u % chunks_);
    };
#pragma omp parallel num_threads(threads) if (parallel)
    {
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) partial(0, u);
      for (int64_t b = 0; b < a_.batch; ++b) {
#pragma omp for schedule(static)
        for (int64_t g = 0; g < a_.groups; ++g) finalize(b * a_.groups + g);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) {
          if (a_.channels_last && b + 1 < a_.batch) apply_nhwc<true>(b, u);
          else if (a_.channels_last) apply_nhwc<false>(b, u);
          else apply_nchw(b * a_.groups + u / chunks_, u % chunks_);
          if (b + 1 < a_.batch) partial(b + 1, u);
        }
      }
    }
  }

 private:
  double pre_bias(int64_t b, int64_t c) const {
    return a_.pre_bias != nullptr ? a_.pre_bias[b * a_.channels + c] : 0.0;
  }

  // base_: the group's first value P, per channel; delta_: pre_bias relative to the group's first channel.
  void set_bases() {
    for (int64_t b = 0; b < a_.batch; ++b) {
      for (int64_t c = 0; c < a_.channels; ++c) {
        const int64_t first = c / per_group_ * per_group_;
        const int64_t at =
            a_.channels_last ? b * a_.spatial * a_.channels + first : (b * a_.channels + first) * a_.spatial;
        base_[b * a_.channels + c] = Tr::load(x_[at]);
        delta_[b * a_.channels + c] = static_cast<float>(pre_bias(b, c) - pre_bias(b, first));
      }
    }
  }

  void partial_nchw(int64_t bg, int64_t k) {
    const int64_t b = bg / a_.groups, first_channel = (bg % a_.groups) * per_group_;
    const int64_t end = std::min(per_group_ * a_.spatial, (k + 1) * kChunk);
    const T* __restrict group = x_ + bg * per_group_ * a_.spatial;
    double sum = 0.0, sumsq = 0.0;
    for (int64_t j = k * kChunk; j < end;) {
      const int64_t local = j / a_.spatial;
      const int64_t stop = std::min(end, (local + 1) * a_.spatial);
      const int64_t bc = b * a_.channels + first_channel + local;
      const float base = base_[bc], delta = delta_[bc];
      for (int64_t i0 = j; i0 < stop; i0 += kBlock) {
        float s = 0.0f, ss = 0.0f;
#pragma omp simd reduction(+ : s, ss)
        for (int64_t i = i0; i < std::min(stop, i0 + kBlock); ++i) {
          const float d = (Tr::load(group[i]) - base) + delta;
          s += d;
          ss += d * d;
        }
        sum += s;
        sumsq += ss;
      }
      j = stop;
    }
    sums_[bg * chunks_ + k] = sum;
    sumsqs_[bg * chunks_ + k] = sumsq;
  }

  // Rows go in blocks of about kBlockBytes, and each block is read for every tile of kTile
  // channels while it is in L1; a tile's accumulators stay in registers over the block's rows,
  // as float sums of kTile rows added to double ones. The last C mod kTile channels accumulate
  // in memory. Walking one tile down the whole chunk instead reads each row's cache lines with
  // a stride; from DRAM that sweep was 1.1x slower at 256 channels (level at 64).
  void partial_nhwc(int64_t b, int64_t k) {
    const int64_t channels = a_.channels, tiled = channels / kTile * kTile;
    const int64_t first_row = k * rows_per_chunk_, end = std::min(a_.spatial, first_row + rows_per_chunk_);
    const int64_t block_rows =
        std::max<int64_t>(1, kBlockBytes / (channels * static_cast<int64_t>(sizeof(T)) * kTile)) * kTile;
    double* __restrict sum = sums_.data() + (b * chunks_ + k) * channels;
    double* __restrict sumsq = sumsqs_.data() + (b * chunks_ + k) * channels;
    for (int64_t r0 = first_row; r0 < end; r0 += block_rows) {
      const int64_t r1 = std::min(end, r0 + block_rows);
      for (int64_t c0 = 0; c0 < tiled; c0 += kTile) {
        float base[kTile], delta[kTile];
        double tile_sum[kTile], tile_sumsq[kTile];
        std::copy_n(base_.data() + b * channels + c0, kTile, base);
        std::copy_n(delta_.data() + b * channels + c0, kTile, delta);
        std::copy_n(sum + c0, kTile, tile_sum);
        std::copy_n(sumsq + c0, kTile, tile_sumsq);
        for (int64_t p0 = r0; p0 < r1; p0 += kTile) {
          float s[kTile] = {}, ss[kTile] = {};
          for (int64_t p = p0; p < std::min(r1, p0 + kTile); ++p) {
            const T* __restrict row = x_ + (b * a_.spatial + p) * channels + c0;
#pragma omp simd
            for (int64_t c = 0; c < kTile; ++c) {
              const float d = (Tr::load(row[c]) - base[c]) + delta[c];
              s[c] += d;
              ss[c] += d * d;
            }
          }
          for (int64_t c = 0; c < kTile; ++c) {
            tile_sum[c] += s[c];
            tile_sumsq[c] += ss[c];
          }
        }
        std::copy_n(tile_sum, kTile, sum + c0);
        std::copy_n(tile_sumsq, kTile, sumsq + c0);
      }
      const float* __restrict base = base_.data() + b * channels;
      const float* __restrict delta = delta_.data() + b * channels;
      for (int64_t p = r0; p < r1 && tiled < channels; ++p) {
        const T* __restrict row = x_ + (b * a_.spatial + p) * channels;
        for (int64_t c = tiled; c < channels; ++c) {
          const float d = (Tr::load(row[c]) - base[c]) + delta[c];
          sum[c] += d;
          sumsq[c] += d * d;
        }
      }
    }
  }

  void finalize(int64_t bg) {
    const int64_t b = bg / a_.groups, first_channel = (bg % a_.groups) * per_group_;
    double sum = 0.0, sumsq = 0.0;
    for (int64_t k = 0; k < chunks_; ++k) {
      if (a_.channels_last) {
        const int64_t base = (b * chunks_ + k) * a_.channels + first_channel;
        for (int64_t d = 0; d < per_group_; ++d) {
          sum += sums_[base + d];
          sumsq += sumsqs_[base + d];
        }
      } else {
        sum += sums_[bg * chunks_ + k];
        sumsq += sumsqs_[bg * chunks_ + k];
      }
    }
    const double count = static_cast<double>(per_group_ * a_.spatial);
    const double shifted_mean = sum / count;
    const double variance = std::max(sumsq / count - shifted_mean * shifted_mean, 0.0);
    const double rstd = 1.0 / std::sqrt(variance + a_.eps);
    for (int64_t c = first_channel; c < first_channel + per_group_; ++c) {
      const int64_t bc = b * a_.channels + c;
      shift_[bc] = static_cast<float>(shifted_mean - static_cast<double>(delta_[bc]));
      scale_[bc] = static_cast<float>(rstd * (a_.weight != nullptr ? a_.weight[c] : 1.0));
      bias_[bc] = a_.bias != nullptr ? a_.bias[c] : 0.0f;
    }
  }

  void apply_nchw(int64_t bg, int64_t k) {
    const int64_t b = bg / a_.groups, first_channel = (bg % a_.groups) * per_group_;
    const int64_t end = std::min(per_group_ * a_.spatial, (k + 1) * kChunk);
    const T* __restrict in = x_ + bg * per_group_ * a_.spatial;
    T* __restrict out = out_ + bg * per_group_ * a_.spatial;
    for (int64_t j = k * kChunk; j < end;) {
      const int64_t local = j / a_.spatial;
      const int64_t stop = std::min(end, (local + 1) * a_.spatial);
      const int64_t bc = b * a_.channels + first_channel + local;
      const float base = base_[bc], shift = shift_[bc], scale = scale_[bc], bias = bias_[bc];
      const T* __restrict run = in + j;
      write(out + j, stop - j, [&](int64_t i) { return silu(((Tr::load(run[i]) - base) - shift) * scale + bias); });
      j = stop;
    }
  }

  // kPrefetchNext: also ask for image b + 1's rows, which the same sweep's partials read next
  // (a template argument: a test in the row loop costs 5-10% when the data is in cache).
  template <bool kPrefetchNext>
  void apply_nhwc(int64_t b, int64_t k) {
    const int64_t channels = a_.channels;
    const int64_t end = std::min(a_.spatial, (k + 1) * rows_per_chunk_);
    const float* __restrict base = base_.data() + b * channels;
    const float* __restrict shift = shift_.data() + b * channels;
    const float* __restrict scale = scale_.data() + b * channels;
    const float* __restrict bias = bias_.data() + b * channels;
    for (int64_t p = k * rows_per_chunk_; p < end; ++p) {
      const T* __restrict in = x_ + (b * a_.spatial + p) * channels;
      T* __restrict out = out_ + (b * a_.spatial + p) * channels;
      if (kPrefetchNext) prefetch(in + a_.spatial * channels, channels * static_cast<int64_t>(sizeof(T)));
      write(out, channels,
            [&](int64_t c) { return silu(((Tr::load(in[c]) - base[c]) - shift[c]) * scale[c] + bias[c]); });
    }
  }

  // out[i] = Tr::store(value(i)) for i < n.
  template <class Value>
  void write(T* __restrict out, int64_t n, const Value& value) {
    if constexpr (std::is_same_v<Tr, BFloat16>) {
      if (bf16_path_ != Bf16Path::kGeneric) {
        for (int64_t i0 = 0; i0 < n; i0 += kStoreBlock) {
          const int64_t m = std::min(kStoreBlock, n - i0);
          float block[kStoreBlock];
#pragma omp simd
          for (int64_t i = 0; i < m; ++i) block[i] = value(i0 + i);
          store_bf16(bf16_path_, block, out + i0, m);
        }
        return;
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = Tr::store(value(i));
  }

  const GroupNormSiluArgs& a_;
  const T* x_;
  T* out_;
  int64_t per_group_;
  Bf16Path bf16_path_;
  int64_t chunks_ = 0, rows_per_chunk_ = 0;
  std::vector<double> sums_, sumsqs_;
  std::vector<float> base_, delta_, shift_, scale_, bias_;
};

}  // namespace
}  // namespace sr3::cpu

namespace sr3 {

void group_norm_silu_cpu(const GroupNormSiluArgs& args, int num_threads) {
  cpu::dispatch_dtype(args.dtype, [&](auto traits) {
    cpu::GroupNormSilu<decltype(traits)>(args).run(std::max(1, num_threads));
  });
}

}  // namespace sr3
