// Runs the CUDA kernels of csrc/info_nce_kernels.cuh on the CPU through emu.h, with the launch
// plan of csrc/info_nce_cuda.cu (kernels::plan). Driven by tests/test_cuda_emulated.py:
//
//   info_nce_emu KERNEL DTYPE B D K T t NEED_PB SMS DIR
//     KERNEL simple | tiled | tc     DTYPE f32 | bf16 | f64 (tiled, tc: f32, bf16)
//     DIR/q.bin, k.bin (B x D), bank.bin (K x D): raw little-endian values of DTYPE
//     writes DIR/loss.bin, lse.bin (B float64), n_pruned.bin (B int64), pb.bin (B x D float64)
//
// Partial and output buffers start poisoned (NaN, -1) so an element no thread wrote is visible.
#include "emu.h"

#include "../../csrc/info_nce_kernels.cuh"

#include <cstdio>
#include <string>
#include <type_traits>

using namespace adam_ext::kernels;

// bf16 for the simple and combine kernels, which convert with static_cast<acc_t>(x).
struct bf16 {
  uint16_t bits;
  operator float() const { return __uint_as_float(unsigned(bits) << 16); }
};

template <class T>
static std::vector<T> read(const std::string& path, size_t n) {
  std::vector<T> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}
template <class T>
static void write(const std::string& path, const std::vector<T>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) std::exit(3);
  std::fclose(f);
}

template <class scalar_t, class acc_t, class raw_t>
static int run(Kernel kind, int64_t B, int64_t D, int64_t K, double T, double t, bool need_pb,
               int64_t sms, const std::string& dir) {
  const auto q = read<scalar_t>(dir + "/q.bin", B * D), k = read<scalar_t>(dir + "/k.bin", B * D);
  const auto bank = read<scalar_t>(dir + "/bank.bin", K * D);
  const Plan pl = plan(kind, B, D, K, sms);
  const int64_t ns = pl.nsplit;
  const acc_t nan = NAN;
  std::vector<acc_t> part_m(ns * B, nan), part_l(ns * B, nan), part_acc(need_pb ? ns * B * D : 0, nan);
  std::vector<int64_t> part_cnt(ns * B, -1);
  if (kind != Kernel::SIMPLE) {
    if constexpr (std::is_same_v<acc_t, float>) {
      const auto* qr = reinterpret_cast<const raw_t*>(q.data());
      const auto* br = reinterpret_cast<const raw_t*>(bank.data());
      const dim3 grid(unsigned(pl.row_tiles), unsigned(ns));
      if (!(kind == Kernel::TILED ? tiled::supports(D) : tc::supports(D))) return 4;
      with_fast_kernel<raw_t>(kind, D, [&](auto kern, int nthreads, int64_t smem) {
        emu::launch(grid, nthreads, smem, [&] {
          kern(qr, br, B, K, pl.rows_per_split, float(T), float(t), need_pb, part_m.data(),
               part_l.data(), part_cnt.data(), need_pb ? part_acc.data() : nullptr);
        });
      });
    } else {
      return 4;
    }
  } else {
    const size_t smem = simple::smem_bytes(D, need_pb, sizeof(acc_t));
    emu::launch(dim3(unsigned(ns), unsigned(pl.row_tiles)), simple::NT, smem, [&] {
      info_nce_partial_kernel<scalar_t, acc_t>(q.data(), bank.data(), B, D, K, pl.rows_per_split, acc_t(T),
                                               acc_t(t), need_pb, part_m.data(), part_l.data(),
                                               part_cnt.data(), need_pb ? part_acc.data() : nullptr);
    });
  }
  std::vector<acc_t> loss(B, nan), lse(B, nan), pb(need_pb ? B * D : 0, nan);
  std::vector<int64_t> n_pruned(B, -1);
  emu::launch(dim3(unsigned(B)), CT, 0, [&] {
    info_nce_combine_kernel<scalar_t, acc_t>(q.data(), k.data(), B, D, ns, acc_t(T), need_pb, part_m.data(),
                                             part_l.data(), part_cnt.data(),
                                             need_pb ? part_acc.data() : nullptr, loss.data(), lse.data(),
                                             n_pruned.data(), need_pb ? pb.data() : nullptr);
  });
  write(dir + "/loss.bin", std::vector<double>(loss.begin(), loss.end()));
  write(dir + "/lse.bin", std::vector<double>(lse.begin(), lse.end()));
  write(dir + "/n_pruned.bin", n_pruned);
  write(dir + "/pb.bin", std::vector<double>(pb.begin(), pb.end()));
  std::printf("row_tiles %lld nsplit %lld rows_per_split %lld\n", (long long)pl.row_tiles, (long long)ns,
              (long long)pl.rows_per_split);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 11) {
    std::fprintf(stderr, "usage: %s KERNEL DTYPE B D K T t NEED_PB SMS DIR\n", argv[0]);
    return 1;
  }
  const std::string kernel = argv[1], dtype = argv[2];
  const int64_t B = std::atoll(argv[3]), D = std::atoll(argv[4]), K = std::atoll(argv[5]);
  const double T = std::atof(argv[6]), t = std::strtod(argv[7], nullptr);  // strtod reads "inf"
  const bool need_pb = std::atoi(argv[8]) != 0;
  const int64_t sms = std::atoll(argv[9]);
  Kernel kind;
  if (kernel == "simple") kind = Kernel::SIMPLE;
  else if (kernel == "tiled") kind = Kernel::TILED;
  else if (kernel == "tc") kind = Kernel::TC;
  else return 1;
  int rc = 1;
  if (dtype == "f32") rc = run<float, float, float>(kind, B, D, K, T, t, need_pb, sms, argv[10]);
  else if (dtype == "bf16") rc = run<bf16, float, uint16_t>(kind, B, D, K, T, t, need_pb, sms, argv[10]);
  else if (dtype == "f64") rc = run<double, double, double>(kind, B, D, K, T, t, need_pb, sms, argv[10]);
  if (rc == 4) std::fprintf(stderr, "tiled takes f32/bf16 with D in {64, 128, 256}, tc f32/bf16 with D in {64, 128}\n");
  return rc;
}
