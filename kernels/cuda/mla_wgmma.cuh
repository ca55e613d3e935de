// Sparse MLA attention for Hopper (sm_90a): warp-specialised, wgmma (bf16 in,
// fp32 accumulate). Internal to kernels/cuda; instantiated and launched by
// mla.cu (LaunchSparseMla with SparseMlaImpl::kWgmma, and kWgmmaPair: the
// kPair switch below, kAuto's choice at heads % 128 == 0).
//
// One CTA per (query token, 64 heads), 384 threads in three warpgroups; the
// selected tokens are processed 64 at a time (a "block") through two shared
// buffers:
//   producer (WG2): gathers the block's 656-byte FP8 records (index-driven,
//     16-byte loads), dequantises them to bf16 (c_kv | k_pe, 576 values per
//     token) into a free buffer, marks invalid slots, signals k_ready.
//   WG0: S = Q K^T (wgmma m64n64k16, Q and K from shared memory, K = 576),
//     masked online softmax in registers (base-2, running max and sum per
//     head), hands P (bf16) and the per-head rescale factor to WG1 through
//     shared memory, then O[:, 0:256] += P V (wgmma m64n256k16, P from
//     registers, V = the block's c_kv read N-major from the same buffer).
//   WG1: O[:, 256:512] += P V with P from shared memory.
// Each gathered record is dequantised once per CTA and used by all 64 heads.
//
// Shared-memory tiles use the wgmma no-swizzle ("interleaved") layout: the
// 16-byte chunk c (values 8c..8c+7) of row r of a 64-row tile sits at byte
// (c * 64 + r) * 16, so 8 rows x 8 values form one contiguous 128-byte core
// matrix. The same key buffer is read K-major as B of Q K^T (N = tokens) and
// N-major as B of P V (K = tokens, N = latent dims).
#ifndef PD_KERNELS_CUDA_MLA_WGMMA_CUH_
#define PD_KERNELS_CUDA_MLA_WGMMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/mla_cuda.h"
#include "kernels/cuda/ptx.cuh"

namespace pd::kernels::cuda::mla_internal {

inline constexpr int kR = 512, kRope = 64, kW = kR + kRope;  // latent, rope, row width
inline constexpr int kRows = 64;                  // heads per CTA (the wgmma M)
inline constexpr int kBlk = 64;                   // selected tokens per block
inline constexpr int kChunks = kW / 8;            // 16-byte bf16 chunks per row (72)
inline constexpr int kTileBytes = kChunks * 64 * 16;  // 64 rows x 576 bf16
inline constexpr int kRecordBytes = 656;          // KvLayout::MlaTokenBytes() for 512/64
inline constexpr int kThreads = 384;
// setmaxnreg budgets. The launch gives every thread 168 registers (65536 / 384,
// rounded down to 8); what WG1 and the producer release (8 + 32 per thread)
// is exactly what WG0 takes (40), so the increase never waits on registers
// outside the CTA's allocation. ptxas fits each role's code into its budget
// (WG0 spills below ~200, WG1 below ~160, the producer below ~112).
inline constexpr int kRegsWg0 = 208, kRegsWg1 = 160, kRegsProducer = 136;
// Split producer (kSplit): two token slots' records per thread (88 registers).
#ifndef PD_MLA_WG1_SPLIT
#define PD_MLA_WG1_SPLIT 160
#endif
inline constexpr int kRegsWg1Split = PD_MLA_WG1_SPLIT, kRegsProducerSplit = 504 - kRegsWg0 - kRegsWg1Split;
// Named barriers (0 is __syncthreads). P hand-over and the final exchange are
// over WG0 + WG1; with Schedule::named, buffer b's "ready" barrier (producer
// arrives, WG0 waits) and "free" barrier (WG0 and WG1 arrive, producer waits)
// replace the k_ready / k_free mbarriers.
inline constexpr int kBarPReady = 1, kBarPFree = 2, kBarFinal = 3;
inline constexpr int kBarReady0 = 4, kBarFree0 = 6;  // + buffer
inline constexpr int kBarQ = 8;  // persistent: WG0 + WG1 staged the next item's Q
// Seesaw consumers (kSeesaw): WG0 -> WG1 "M_e published" / "P_e published",
// WG1 -> WG0 "M_o published" / "P_o published" (one arrival side, one sync side each).
inline constexpr int kBarME = 9, kBarPE = 10, kBarMO = 11, kBarPO = 12;
// Seesaw register budgets: both consumer warpgroups hold O (128) + S (32) + P;
// 2 x 192 + 120 = 504 = 3 x 168 (the launch's allocation).
#ifndef PD_MLA_SEESAW_REGS
#define PD_MLA_SEESAW_REGS 192
#endif
inline constexpr int kRegsSeesaw = PD_MLA_SEESAW_REGS, kRegsSeesawProducer = 504 - 2 * kRegsSeesaw;

// Benchmark-only variants (SparseMlaParams::experiment); results are garbage.
inline constexpr int kVariantFull = 0;
inline constexpr int kVariantNoProducer = 1;  // producer only signals: consumers' time
inline constexpr int kVariantNoConsumer = 2;  // consumers only release: producer's time

struct Smem {
  uint8_t q[kTileBytes];           // Q (bf16): chunk c of head row h at (c * 64 + h) * 16
  uint8_t kv[2][kTileBytes];       // block tokens (bf16): chunk c of slot j at (c * 64 + j) * 16
  uint8_t p[kBlk / 8 * kRows * 16];  // P (bf16): tokens 8c..8c+7 of head h at (c * 64 + h) * 16
  float o_scale[kRows];            // WG0 -> WG1: exp2(m_old - m_new) of the current block
  float row_l[2][kRows];           // final softmax sums (WG0 -> WG1), by item parity
  float row_m[kRows];
  float m_e[kRows], m_o[kRows];    // seesaw: running max after WG0's (even) / WG1's (odd) block
  uint8_t valid[2][kBlk];          // slot j of buffer b holds a valid token
  uint64_t k_ready[2];             // producer -> consumers (128 arrivals)
  uint64_t k_free[2];              // consumers -> producer (256 arrivals)
};

// ---------------------------------------------------------------- PTX helpers

__device__ __forceinline__ void MbarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(ptx::SmemAddr(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
          ptx::SmemAddr(bar))
      : "memory");
}
// Waits until the phase of parity `parity` has completed (a fresh barrier
// counts its phase before phase 0, parity 1, as completed).
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "MLA_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra MLA_WAIT;\n}\n" ::"r"(ptx::SmemAddr(bar)),
      "r"(parity)
      : "memory");
}
// ------------------------------------------------ cluster (pair) helpers
// The rank of this CTA in its cluster.
__device__ __forceinline__ uint32_t ClusterRank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// The shared::cluster address of the variable at shared::cta address `addr`
// in the CTA of rank `rank` of this cluster.
__device__ __forceinline__ uint32_t MapaShared(uint32_t addr, uint32_t rank) {
  uint32_t d;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(d) : "r"(addr), "r"(rank));
  return d;
}
__device__ __forceinline__ void StClusterV4(uint32_t addr, const uint4 v) {
  asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void StClusterU8(uint32_t addr, uint32_t v) {
  asm volatile("st.shared::cluster.u8 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
// Arrives (release at cluster scope) on the mbarrier at shared::cluster
// address `addr` (this CTA's or another's of the cluster).
__device__ __forceinline__ void MbarArriveCluster(uint32_t addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(addr)
               : "memory");
}
// MbarWait with acquire at cluster scope: for barriers that CTAs of the
// cluster arrive on remotely.
__device__ __forceinline__ void MbarWaitCluster(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "MLA_WAIT_CL:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra MLA_WAIT_CL;\n}\n" ::"r"(ptx::SmemAddr(bar)),
      "r"(parity)
      : "memory");
}
// Asynchronous 16-byte store to shared::cluster address `addr` (this CTA's or
// the peer's), completing 16 bytes (complete_tx, release at cluster scope) on
// the mbarrier at shared::cluster address `mbar` of the same CTA as `addr`. No
// fence: the waiter sees the data once the barrier's phase completes.
__device__ __forceinline__ void StAsyncV4(uint32_t addr, const uint4 v, uint32_t mbar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(addr),
      "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(mbar)
      : "memory");
}
// Arrives on this CTA's mbarrier and raises its expected transaction bytes.
__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   ptx::SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}
// Arrives on an mbarrier at a shared::cluster address with the default
// semantics (release at CTA scope; a buffer release: nothing written to publish).
__device__ __forceinline__ void MbarArriveRemote(uint32_t addr) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(addr) : "memory");
}
// Makes this CTA's mbarrier initialisations visible to the cluster.
__device__ __forceinline__ void FenceMbarInitCluster() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Orders this thread's generic-proxy writes to shared::cluster memory (its
// own CTA's and other CTAs') before later async-proxy (wgmma) reads.
__device__ __forceinline__ void FenceProxyAsyncCluster() {
  asm volatile("fence.proxy.async.shared::cluster;\n" ::: "memory");
}
// Every thread of every CTA of the cluster (also a CTA-wide barrier).
__device__ __forceinline__ void ClusterSync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
}

__device__ __forceinline__ void NamedSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int N>
__device__ __forceinline__ void RegAlloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void RegDealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// Pins a register operand of wgmma in program order (CUTLASS's
// warpgroup_fence_operand): keeps the compiler from moving writes of it past a
// wgmma.fence or reads and reuse of it ahead of the wgmma.wait_group.
__device__ __forceinline__ void FenceReg(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
template <int N>
__device__ __forceinline__ void FenceRegs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) ptx::FenceOperand(d[i]);
}

// 16-byte cp.async global -> shared; src_bytes 0 writes zeros (nothing read).
__device__ __forceinline__ void CpAsync16Zfill(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void PrefetchL2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// wgmma descriptor of a no-swizzle tile: lbo = byte distance between core
// matrices along K, sbo = along M/N.
__device__ __forceinline__ uint64_t NoSwizzleDesc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_addr & 0x3FFFFu) >> 4) | (uint64_t(lbo >> 4) << 16) |
         (uint64_t(sbo >> 4) << 32);
}

__device__ __forceinline__ uint32_t PackBf16x2(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// D[64 x 64] (+)= A[64 x 16] * B[64 x 16]^T, bf16, both operands K-major in shared
// memory; accumulate = 0 overwrites D. Accumulator layout as WgmmaM64N128K32E4M3.
__device__ __forceinline__ void WgmmaM64N64K16SS(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                 int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D[64 x 256] += A[64 x 16] * B[16 x 256], bf16; A from registers (the
// mma.sync m16n8k16 A fragment of warp w's rows 16w..16w+15), B N-major in shared memory.
__device__ __forceinline__ void WgmmaM64N256K16RS(float (&d)[128], const uint32_t (&a)[4],
                                                  uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// D[64 x 256] += A[64 x 16] * B[16 x 256], bf16; A K-major, B N-major, both in
// shared memory.
__device__ __forceinline__ void WgmmaM64N256K16SS(float (&d)[128], uint64_t desc_a,
                                                  uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

// ------------------------------------------------------------ dequantisation

// Two e4m3 bytes (the low byte is the first value) times a power-of-two scale,
// as a bf16x2 word (first value in the low half). e4m3 -> f16 is exact; moving
// the f16 exponent and top mantissa bits into bf16 position gives value *
// 2^-112 (e4m3 has 3 mantissa bits and nothing below 2^-9, so this is exact and
// never subnormal); s2 = 2^112 * scale (exact in bf16 for scale <= 2^15)
// restores the magnitude exactly, as the fp32 product rounded to bf16 would.
__device__ __forceinline__ uint32_t Fp8x2ToBf16x2(uint32_t two, __nv_bfloat162 s2) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(two & 0xffffu), __NV_E4M3);
  const uint32_t hb = uint32_t(h.x) | (uint32_t(h.y) << 16);
  const uint32_t b = ((hb & 0x7fff7fffu) >> 3) | (hb & 0x80008000u);
  __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&b);
  v = __hmul2(v, s2);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The same through fp32, for any scale (the rare groups with scale > 2^15).
__device__ __forceinline__ uint32_t Fp8x2ToBf16x2Slow(uint32_t two, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(two & 0xffffu), __NV_E4M3);
  const float2 f = __half22float2(__half2(h));
  return PackBf16x2(f.x * scale, f.y * scale);
}

// 16 e4m3 values (16 bytes, value i in byte i) times `scale` -> bf16 values
// 0..7 in lo and 8..15 in hi.
__device__ __forceinline__ void Dequant16(const uint4 v, float scale, uint4& lo, uint4& hi) {
  if (scale <= 32768.0f) {
    const __nv_bfloat162 s2 = __float2bfloat162_rn(scale * 5.192296858534828e33f);  // * 2^112
    lo = make_uint4(Fp8x2ToBf16x2(v.x, s2), Fp8x2ToBf16x2(v.x >> 16, s2),
                    Fp8x2ToBf16x2(v.y, s2), Fp8x2ToBf16x2(v.y >> 16, s2));
    hi = make_uint4(Fp8x2ToBf16x2(v.z, s2), Fp8x2ToBf16x2(v.z >> 16, s2),
                    Fp8x2ToBf16x2(v.w, s2), Fp8x2ToBf16x2(v.w >> 16, s2));
  } else {
    lo = make_uint4(Fp8x2ToBf16x2Slow(v.x, scale), Fp8x2ToBf16x2Slow(v.x >> 16, scale),
                    Fp8x2ToBf16x2Slow(v.y, scale), Fp8x2ToBf16x2Slow(v.y >> 16, scale));
    hi = make_uint4(Fp8x2ToBf16x2Slow(v.z, scale), Fp8x2ToBf16x2Slow(v.z >> 16, scale),
                    Fp8x2ToBf16x2Slow(v.w, scale), Fp8x2ToBf16x2Slow(v.w >> 16, scale));
  }
}

__device__ __forceinline__ void StoreChunk(uint8_t* tile, int chunk, int row, const uint4 v) {
  *reinterpret_cast<uint4*>(tile + (chunk * 64 + row) * 16) = v;
}

// --------------------------------------------------------------------- kernel

// Q (fp32) of 64 heads h0.. of token t -> the bf16 tile q, by kNT threads
// (index i0 in 0..kNT-1); chunk-major so that a warp's stores are contiguous;
// passes of 6 chunks per thread with every load of a pass issued first.
template <int kNT, int kPer = 6>
__device__ __forceinline__ void StageQ(const SparseMlaParams& p, uint8_t* q, int64_t t, int h0,
                                       int i0) {
  constexpr int kPasses = kChunks * kRows / (kNT * kPer);
  static_assert(kChunks * kRows % (kNT * kPer) == 0, "Q staging passes");
  const int H = p.heads;
  // Opaque: keeps the compiler from hoisting the per-chunk offsets out of a
  // persistent item loop (they would stay live across it).
  asm volatile("" : "+r"(i0));
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    float4 qv[kPer][2];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int i = i0 + (pass * kPer + k) * kNT;
      const int c = i / kRows, h = i % kRows;
      const int64_t qh = t * H + h0 + h;
      const float* src =
          c < kR / 8 ? p.q_abs + qh * kR + 8 * c : p.q_pe + qh * kRope + 8 * (c - kR / 8);
      qv[k][0] = __ldg(reinterpret_cast<const float4*>(src));
      qv[k][1] = __ldg(reinterpret_cast<const float4*>(src) + 1);
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int i = i0 + (pass * kPer + k) * kNT;
      const float4 a = qv[k][0], b = qv[k][1];
      *reinterpret_cast<uint4*>(q + i * 16) =
          make_uint4(PackBf16x2(a.x, a.y), PackBf16x2(a.z, a.w), PackBf16x2(b.x, b.y),
                     PackBf16x2(b.z, b.w));
    }
  }
}

// The pair producer's registers for one token slot of one block: 16 bytes of
// each 64 of the record's e4m3 values (column `sub`), the 4 scales, a quarter
// of k_pe.
struct PairRegs {
  uint4 raw[8];
  float4 sc;
  uint4 pe[2];
};

// The pair producer thread's gather chain: token slot `slot` of every block
// of query token t: index -> page -> record.
struct PairGather {
  const uint8_t* pool;
  const int32_t* ptab;     // the sequence's page-table row
  const int32_t* idx_row;  // indices[t, :]
  int64_t ntok;
  int topk, nb, slot, sub;

  __device__ __forceinline__ PairGather(const SparseMlaParams& p, int64_t t, int blocks, int tid)
      : pool(p.cache.pool), idx_row(p.indices + t * p.topk), topk(p.topk), nb(blocks) {
    const int seq = p.query_seq != nullptr ? p.query_seq[t] : 0;
    ntok = p.cache.num_tokens[seq];
    ptab = p.cache.page_table + seq * p.cache.page_table_stride;
    const int pt = tid - 2 * 128, lane = tid & 31;
    slot = int(ClusterRank()) * 32 + (pt >> 5) * 8 + (lane & 7);
    sub = lane >> 3;
  }
  // The slot's index in block b; -1 outside top-k, for -1 and for >= the
  // sequence's length.
  __device__ __forceinline__ int32_t Index(int b) const {
    const int i = b * kBlk + slot;
    const int32_t idx = b < nb && i < topk ? __ldg(idx_row + i) : -1;
    return idx >= 0 && idx < ntok ? idx : -1;
  }
  // The same for the peer's slot (slot ^ 32), whose valid flag this thread
  // writes with kAsync.
  __device__ __forceinline__ int32_t IndexPeer(int b) const {
    const int i = b * kBlk + (slot ^ 32);
    const int32_t idx = b < nb && i < topk ? __ldg(idx_row + i) : -1;
    return idx >= 0 && idx < ntok ? idx : -1;
  }
  __device__ __forceinline__ int32_t Page(int32_t idx) const {
    return idx >= 0 ? __ldg(ptab + (idx >> 6)) : 0;
  }
  // Issues the loads of token idx's record (nothing for idx < 0).
  __device__ __forceinline__ void Issue(PairRegs& r, int32_t idx, int32_t page) const {
    if (idx >= 0) {
      const uint8_t* rec = pool + size_t(page) * (size_t(kPageTokens) * kRecordBytes) +
                           size_t(idx & 63) * kRecordBytes;
#pragma unroll
      for (int gi = 0; gi < 8; ++gi) {
        r.raw[gi] = __ldg(reinterpret_cast<const uint4*>(rec + 64 * gi + 16 * sub));
      }
      r.sc = __ldg(reinterpret_cast<const float4*>(rec + kR));
      r.pe[0] = __ldg(reinterpret_cast<const uint4*>(rec + kR + 16 + 16 * sub));
      r.pe[1] = __ldg(reinterpret_cast<const uint4*>(rec + kR + 16 + 16 * (sub + 4)));
    }
  }
  // Prefetches token idx's record into L2 (every 128-byte line of it: offsets
  // 0..640 and its last byte, over the token's 4 threads).
  __device__ __forceinline__ void Prefetch(int32_t idx, int32_t page) const {
    if (idx >= 0) {
      const uint8_t* rec = pool + size_t(page) * (size_t(kPageTokens) * kRecordBytes) +
                           size_t(idx & 63) * kRecordBytes;
      PrefetchL2(rec + 128 * sub);
      if (sub < 3) PrefetchL2(rec + (sub == 0 ? 512 : sub == 1 ? 640 : kRecordBytes - 1));
    }
  }
};

// Compile-time schedule of the kernel.
//   late: WG0 hands block b's P to WG1 only after issuing block b+1's Q K^T, so
//     the tensor pipe runs WG1's P V of block b while WG0 does block b+1's
//     softmax (otherwise it idles there); costs the producer slack, since the
//     buffer of block b is released later.
//   prefetch: the producer prefetches block b+2's records into L2 while it
//     works on block b (a block of lead before its own loads).
//   named: buffer hand-over through named barriers (bar.sync / bar.arrive,
//     waiting warps sleep in hardware) instead of mbarrier try_wait loops,
//     whose spinning takes issue slots from the warps doing the work.
// A fourth template switch, kBf16 (SparseMlaParams::bf16_rows set, not with
// late), makes the producer copy up-converted bf16 rows with cp.async
// (nothing to dequantise; block b+1's copies fly while the consumers work on
// block b) instead of gathering and dequantising the FP8 records.
// A fifth, kPair (SparseMlaImpl::kWgmmaPair; plain mbarriers, neither late
// nor named): the two CTAs of a token's
// 64-head blocks 2k and 2k+1 form a cluster of 2 and share each block's
// gather and dequantisation. The producer of rank r gathers slots
// [32 r, 32 r + 32) of every block (one token per thread: 4 threads x 16 of
// every 64 bytes), dequantises them and stores the bf16 chunks into both
// CTAs' buffers (st.shared::cluster for the peer's), and arrives on both
// CTAs' k_ready; consumers arrive on both CTAs' k_free (each producer writes
// into both buffers, so it waits for both CTAs' releases). Every barrier
// phase thus counts 128 + 128 producer arrivals (k_ready) and 256 + 256
// consumer arrivals (k_free). The producer also keeps block b+1's record
// loads in flight (in registers) while it waits for block b's buffer and
// dequantises block b. Both CTAs pass a cluster barrier after the barrier
// initialisation (before any remote arrival) and before exiting (after the
// last remote store or arrival into the peer). With kPrefetch the pair
// producer also prefetches block b+3's records into L2 at block b; with kBf16
// it copies its 32 rows of every block through registers into both CTAs'
// buffers (no dequantisation), kPrefetch prefetching block b+2's rows. kEarly
// (pair over FP8 only) issues the first index and page loads before the Q
// staging. kAsync (pair): the producers write the tiles of both CTAs with
// st.async (completion counted in bytes on the target CTA's k_ready) instead
// of st.shared[::cluster] + proxy fences + release.cluster arrivals, whose
// fences waited for the producer's own record loads in flight (ncu, run 1:
// CCTL.IVALL of the acquire.cluster wait and ERRBAR of the release.cluster
// arrive); k_ready counts the 4 local producer warps (warp 0 also expects the
// 73728 bytes), each CTA writes all 64 valid flags itself (the peer's slots
// from their indices), waits are CTA-scope (no L1 invalidation) and the
// consumers fence the async proxy after their k_ready wait. Measured slower
// than the st.shared::cluster hand-over on the H200 (docs/perf.md): the
// 16-byte st.async land later than plain stores. kPersist (pair + kAsync):
// as many clusters as fit, each looping over token pairs (measured slower too,
// being built on kAsync). Both are benchmark experiments, not defaults.
// kLight (pair, st.shared hand-over; not yet measured): only the buffer
// releases become CTA-scope: the producer's k_free wait without acquire.cluster
// (whose L1 invalidation waited for its own record loads in flight) and the
// consumers' remote arrivals with the default semantics; the data path keeps
// st.shared::cluster, the proxy fences and the release.cluster arrival.
struct Schedule {
  bool late;
  bool prefetch;
  bool named;
};

// Grid: num_queries * (heads / 64) CTAs, CTA x = query token x / (heads / 64),
// head block x % (heads / 64); kThreads threads; sizeof(Smem) dynamic shared
// memory. Launch contract checked by LaunchSparseMla.
template <int kVariant, bool kLate, bool kPrefetch, bool kNamed, bool kBf16, bool kPair,
          bool kEarly, bool kAsync, bool kPersist, bool kLight, bool kSeesaw, bool kSplit, bool kAfter, bool kOverlap>
__global__ void __launch_bounds__(kThreads, 1) SparseMlaWgmmaKernel(const SparseMlaParams p) {
  static_assert(!kBf16 || ((kVariant == kVariantFull || (kPair && kVariant == kVariantNoConsumer)) &&
                            !kLate),
                "bf16 rows: full (pair: also the producer alone), not late");
  static_assert(!kPair || (!kLate && !kNamed), "pair: mbarrier schedule, no late hand-over");
  static_assert(!kEarly || (kPair && !kBf16), "early gather start: pair over FP8 records only");
  static_assert(!kAsync || (kPair && kVariant != kVariantNoProducer),
                "st.async hand-over: pair, with a producer");
  static_assert(!kPersist || kPair, "persistent: pair only");
  static_assert(!kLight || (kPair && !kAsync), "CTA-scope buffer waits: pair, st.shared hand-over");
  static_assert(!kSeesaw || (kPair && !kBf16 && !kAsync && !kPersist &&
                             kVariant != kVariantNoConsumer),
                "seesaw consumers: pair over FP8 records, st.shared hand-over, not persistent");
  static_assert(!kAfter || (kPair && !kBf16 && !kAsync && !kSplit), "loads after the publish: pair gather");
  static_assert(!kOverlap || (kPair && !kLate && !kNamed && !kSeesaw && kVariant != kVariantNoConsumer),
                "overlapped WG0: pair, mbarrier schedule, with consumers");
  static_assert(!kSplit || (kPair && !kBf16 && !kAsync && !kPersist && !kEarly &&
                            kVariant != kVariantNoProducer),
                "split producer: pair over FP8 records, st.shared hand-over, one item, no early start");
  extern __shared__ __align__(128) uint8_t smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x;
  const int head_blocks = p.heads / kRows;
  // Work items: CTA-equivalents x = token x / head_blocks, heads from
  // (x % head_blocks) * 64. One per CTA (x = blockIdx.x), or, persistent, the
  // cluster c of G handles the pairs c, c + G, ... (x = 2 pair + rank).
  // (At most 2^31 - 1 items: LaunchSparseMla's check; x + x_stride fits 32 bits.)
  const uint32_t n_items = uint32_t(p.num_queries * head_blocks);
  uint32_t x0 = blockIdx.x, x_stride = n_items;
  if constexpr (kPersist) {
    x0 = 2 * (blockIdx.x / 2) + ClusterRank();
    x_stride = 2 * (gridDim.x / 2);
  }
  const int64_t t = x0 / head_blocks;
  const int h0 = int(x0 % head_blocks) * kRows;
  const int H = p.heads;
  const int nb = (p.topk + kBlk - 1) / kBlk;

  // The pair producer's gather chain over FP8 records (threads 256..383): the
  // indices of blocks 0-2 and the pages of blocks 0-1 (gather_indices; with
  // kPrefetch also block 3's index and block 2's page), then block 0's record
  // loads; with kEarly the index and page loads are issued before the Q
  // staging (their two dependent round trips overlap it), otherwise at the
  // start of the producer's loop.
  constexpr bool kPairGather = kPair && !kBf16 && kVariant != kVariantNoProducer;
  int32_t g_idx_cur = -1, g_idx_n1 = -1, g_idx_n2 = -1, g_idx_n3 = -1, g_pg_cur = 0, g_pg_n1 = 0,
          g_pg_n2 = 0, g_pidx_cur = -1;
  auto gather_indices = [&](const PairGather& g) {
    if constexpr (kAsync) g_pidx_cur = g.sub == 1 ? g.IndexPeer(0) : -1;
    g_idx_cur = g.Index(0);
    g_idx_n1 = g.Index(1);
    g_idx_n2 = g.Index(2);
    if constexpr (kPrefetch) g_idx_n3 = g.Index(3);
    g_pg_cur = g.Page(g_idx_cur);
    g_pg_n1 = g.Page(g_idx_n1);
    if constexpr (kPrefetch) g_pg_n2 = g.Page(g_idx_n2);
  };
  if constexpr (kPairGather && kEarly) {
    if (tid >= 256) gather_indices(PairGather(p, t, nb, tid));
  }

  // The first item's Q, by every thread (later items' by the producer).
  StageQ<kThreads>(p, sm.q, t, h0, tid);
  if (tid == 0) {
    constexpr uint32_t kCtas = kPair ? 2 : 1;
    // kAsync: one arrival per local producer warp (the data counts as bytes).
    constexpr uint32_t kReadyCount = kAsync ? 4 : (kSplit ? 64 : 128) * kCtas;  // kSplit: a group per block
    MbarInit(&sm.k_ready[0], kReadyCount);
    MbarInit(&sm.k_ready[1], kReadyCount);
    MbarInit(&sm.k_free[0], 256 * kCtas);
    MbarInit(&sm.k_free[1], 256 * kCtas);
    if constexpr (kPair) FenceMbarInitCluster();
  }
  ptx::FenceProxyAsync();  // Q is read by wgmma
  if constexpr (kPair) {
    ClusterSync();  // the peer's barriers are initialised before any remote arrival
  } else {
    __syncthreads();
  }

  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int lane = tid & 31, g = lane >> 2, c4 = lane & 3;
  const int r0 = 16 * ((tid >> 5) & 3) + g;  // consumer rows r0 and r0 + 8
  const float kNegInf = -__int_as_float(0x7f800000);
  // Buffer hand-over. The producer waits for block b's buffer (free once block
  // b-2 is released by WG0 and WG1) and publishes block b to WG0; WG1 learns of
  // it through WG0's P hand-over (kBarPReady), which comes after WG0's wait,
  // so WG1 never waits on the producer (with the late hand-over it must not:
  // WG0 passes block b's wait before it hands block b-1 to WG1). Only in the
  // timing-only kVariantNoConsumer, which has no P hand-over, does WG1 wait
  // for the data itself. Named: every released block except the last two is
  // waited on by the producer, so arrivals and waits pair up.
  constexpr int kReadyThreads = kVariant == kVariantNoConsumer ? 384 : 256;
  // Pair: the peer CTA's k_free barriers (consumers release into both CTAs).
  uint32_t peer_free[2] = {0u, 0u};
  if constexpr (kPair) {
    const uint32_t peer = ClusterRank() ^ 1u;
    peer_free[0] = MapaShared(ptx::SmemAddr(&sm.k_free[0]), peer);
    peer_free[1] = MapaShared(ptx::SmemAddr(&sm.k_free[1]), peer);
  }
  auto consumer_wait = [&](int b) {
    if constexpr (kNamed) {
      NamedSync(kBarReady0 + (b & 1), kReadyThreads);
    } else if constexpr (kAsync) {
      // The data came through st.async (both CTAs' producers) and the valid
      // flags from the local producer (released by its arrivals); the wgmma
      // reads go through the async proxy.
      MbarWait(&sm.k_ready[b & 1], uint32_t(b >> 1) & 1u);
      ptx::FenceProxyAsync();
    } else if constexpr (kPair) {
      MbarWaitCluster(&sm.k_ready[b & 1], uint32_t(b >> 1) & 1u);
    } else {
      MbarWait(&sm.k_ready[b & 1], uint32_t(b >> 1) & 1u);
    }
  };
  auto consumer_release = [&](int b) {
    if constexpr (kNamed) {
      if (b + 2 < nb) NamedArrive(kBarFree0 + (b & 1), 384);
    } else if constexpr (kAsync || kLight) {
      MbarArrive(&sm.k_free[b & 1]);
      MbarArriveRemote((b & 1) ? peer_free[1] : peer_free[0]);
    } else {
      MbarArrive(&sm.k_free[b & 1]);
      if constexpr (kPair) MbarArriveCluster((b & 1) ? peer_free[1] : peer_free[0]);
    }
  };

  if (kSeesaw && wg < 2) {
    // ------------------------------------ seesaw consumers (kSeesaw, pair only)
    // WG w owns O[:, 256 w : 256 w + 256] and computes S = Q K^T and the
    // softmax of the blocks b with b % 2 == w; both multiply every block's P
    // into their half of V, so the tensor pipe runs one WG's GEMMs while the
    // other is in its softmax. The running max travels WG0 (block 2j) -> WG1
    // (2j+1) -> WG0 (2j+2) through m_e / m_o (per row). P of block b goes into
    // the k_pe chunks of b's own buffer (64..71, 8 KB: read only by b's Q K^T,
    // which is done by then) in the wgmma A layout, and both WGs read it from
    // there (P V with both operands in shared memory). Iteration j: WG0 has
    // its block 2j and the other's 2j-1, WG1 its 2j+1 and the other's 2j; the
    // other's block goes first (older max). Each WG releases a buffer once its
    // P V of it completed. Named barriers: WG0 -> WG1 kBarME (m_e), kBarPE
    // (P of 2j); WG1 -> WG0 kBarMO, kBarPO. Each WG syncs the other's M and P
    // barriers before it arrives on its own, so no barrier gets a second
    // arrival before its sync.
    RegAlloc<kRegsSeesaw>();
    const bool w0 = wg == 0;
    const float sl2 = p.softmax_scale * 1.4426950408889634f;
    const uint64_t dq = NoSwizzleDesc(ptx::SmemAddr(sm.q), 1024, 128);
    const uint32_t v_off = w0 ? 0u : 32u * 64u * 16u;  // V[:, 256 w ..]
    constexpr uint32_t kPOff = uint32_t(kR / 8) * 64u * 16u;  // the k_pe chunks: P
    const int bar_m_out = w0 ? kBarME : kBarMO, bar_m_in = w0 ? kBarMO : kBarME;
    const int bar_p_out = w0 ? kBarPE : kBarPO, bar_p_in = w0 ? kBarPO : kBarPE;
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    float om0 = -1e30f, om1 = -1e30f;  // the max O is scaled to (its last P's)
    float lm0 = -1e30f, lm1 = -1e30f, l0 = 0.0f, l1 = 0.0f;  // own blocks' sum, relative to lm
    const int njp = (nb + 1) / 2;
    // O (+)= P_b V_b[:, 256 w ..] after scaling O from om to max m.
    auto pv = [&](int b, float m0, float m1, bool waited) {
      const float f0 = Exp2(om0 - m0), f1 = Exp2(om1 - m1);
      om0 = m0;
      om1 = m1;
      if (__any_sync(0xffffffffu, f0 != 1.0f || f1 != 1.0f)) {  // this warp's rows' max moved
        if (!waited) {
          ptx::WgmmaWait<0>();
          FenceRegs(o);
        }
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          o[4 * i] *= f0;
          o[4 * i + 1] *= f0;
          o[4 * i + 2] *= f1;
          o[4 * i + 3] *= f1;
        }
      }
      const uint32_t kv = ptx::SmemAddr(sm.kv[b & 1]);
      const uint64_t dp = NoSwizzleDesc(kv + kPOff, 1024, 128);
      const uint64_t dv = NoSwizzleDesc(kv + v_off, 128, 1024);
      FenceRegs(o);
      ptx::WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kBlk / 16; ++kk) {
        WgmmaM64N256K16SS(o, dp + uint64_t(kk * 128), dv + uint64_t(kk * 16));
      }
      ptx::WgmmaCommit();
    };
#pragma unroll 1
    for (int j = 0; j <= njp; ++j) {
      const int blk = 2 * j + wg;               // own block
      const int oblk = w0 ? 2 * j - 1 : 2 * j;  // the other WG's block
      const bool has_s = blk < nb;
      const bool has_o = oblk >= 0 && oblk < nb;
      if (!has_s && !has_o) break;
      float mn0 = -1e30f, mn1 = -1e30f;  // the running max after the own block
      float mo0 = -1e30f, mo1 = -1e30f;  // ... after the other's
      if (has_s) {
        consumer_wait(blk);
        const uint32_t kv = ptx::SmemAddr(sm.kv[blk & 1]);
        const uint64_t dk = NoSwizzleDesc(kv, 1024, 128);
        float s[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] = 0.0f;
        FenceRegs(s);
        ptx::WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kChunks / 2; ++kk) {
          WgmmaM64N64K16SS(s, dq + uint64_t(kk * 128), dk + uint64_t(kk * 128), kk > 0);
        }
        ptx::WgmmaCommit();
        ptx::WgmmaWait<0>();
        FenceRegs(s);
        const uint8_t* valid = sm.valid[blk & 1];
        float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t v2 = *reinterpret_cast<const uint16_t*>(valid + 8 * i + 2 * c4);
          const bool va = (v2 & 0xffu) != 0, vb = (v2 >> 8) != 0;
          s[4 * i] = va ? s[4 * i] * sl2 : kNegInf;
          s[4 * i + 1] = vb ? s[4 * i + 1] * sl2 : kNegInf;
          s[4 * i + 2] = va ? s[4 * i + 2] * sl2 : kNegInf;
          s[4 * i + 3] = vb ? s[4 * i + 3] * sl2 : kNegInf;
          mx0 = fmaxf(mx0, fmaxf(s[4 * i], s[4 * i + 1]));
          mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
        }
#pragma unroll
        for (int sh = 1; sh <= 2; sh <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, sh));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, sh));
        }
        // The running max before the own block: the other's last (WG0 at j = 0: none).
        if (blk > 0) {
          NamedSync(bar_m_in, 256);
          mo0 = (w0 ? sm.m_o : sm.m_e)[r0];
          mo1 = (w0 ? sm.m_o : sm.m_e)[r0 + 8];
        }
        if (has_o) NamedSync(bar_p_in, 256);  // before the own arrivals (see above)
        mn0 = fmaxf(mo0, mx0);
        mn1 = fmaxf(mo1, mx1);
        if (c4 == 0) {
          (w0 ? sm.m_e : sm.m_o)[r0] = mn0;
          (w0 ? sm.m_e : sm.m_o)[r0 + 8] = mn1;
        }
        // The other syncs this max only if it has the next block (WG0's M_e:
        // WG1 with block 2j+1; WG1's M_o: WG0 with block 2j+2).
        if (blk + 1 < nb) NamedArrive(bar_m_out, 256);
        const float f0 = Exp2(lm0 - mn0), f1 = Exp2(lm1 - mn1);
        lm0 = mn0;
        lm1 = mn1;
        float sum0 = 0.0f, sum1 = 0.0f;
        uint8_t* pt = sm.kv[blk & 1] + kPOff;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float pa = Exp2(s[4 * i] - mn0), pb = Exp2(s[4 * i + 1] - mn0);
          const float pc = Exp2(s[4 * i + 2] - mn1), pd = Exp2(s[4 * i + 3] - mn1);
          sum0 += pa + pb;
          sum1 += pc + pd;
          *reinterpret_cast<uint32_t*>(pt + (i * 64 + r0) * 16 + 4 * c4) = PackBf16x2(pa, pb);
          *reinterpret_cast<uint32_t*>(pt + (i * 64 + r0 + 8) * 16 + 4 * c4) = PackBf16x2(pc, pd);
        }
        l0 = l0 * f0 + sum0;
        l1 = l1 * f1 + sum1;
        ptx::FenceProxyAsync();  // P is read by wgmma (both WGs)
        NamedArrive(bar_p_out, 256);
      } else {
        // No own block (the last pair: WG0 with nb even, WG1 with nb odd):
        // only the other's; its max comes with its P.
        NamedSync(bar_p_in, 256);
      }
      if (has_o) {
        // The other's max: WG0 read M_{2j-1} above (or reads it now, last
        // pair); WG1's is M_{2j} (read above).
        if (!has_s) {
          mo0 = (w0 ? sm.m_o : sm.m_e)[r0];
          mo1 = (w0 ? sm.m_o : sm.m_e)[r0 + 8];
        }
        pv(oblk, mo0, mo1, true);
      }
      if (has_s) pv(blk, mn0, mn1, !has_o);
      // Both P V done (the other WG keeps the tensor pipe busy meanwhile).
      ptx::WgmmaWait<0>();
      FenceRegs(o);
      if (has_o) consumer_release(oblk);
      if (has_s) consumer_release(blk);
    }
    // Final: both WGs' sums at the final max (O is scaled to it: om).
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, sh);
      l1 += __shfl_xor_sync(0xffffffffu, l1, sh);
    }
    if (c4 == 0) {
      sm.row_l[wg][r0] = l0;
      sm.row_l[wg][r0 + 8] = l1;
      (w0 ? sm.row_m : sm.o_scale)[r0] = lm0;
      (w0 ? sm.row_m : sm.o_scale)[r0 + 8] = lm1;
    }
    NamedSync(kBarFinal, 256);
    const float la0 = sm.row_l[0][r0], la1 = sm.row_l[0][r0 + 8];
    const float lb0 = sm.row_l[1][r0], lb1 = sm.row_l[1][r0 + 8];
    const float ma0 = sm.row_m[r0], ma1 = sm.row_m[r0 + 8];
    const float mb0 = sm.o_scale[r0], mb1 = sm.o_scale[r0 + 8];
    const float mf0 = fmaxf(ma0, mb0), mf1 = fmaxf(ma1, mb1);
    const float L0 = la0 * Exp2(ma0 - mf0) + lb0 * Exp2(mb0 - mf0);
    const float L1 = la1 * Exp2(ma1 - mf1) + lb1 * Exp2(mb1 - mf1);
    const float i0 = L0 > 0.0f ? 1.0f / L0 : 0.0f, i1 = L1 > 0.0f ? 1.0f / L1 : 0.0f;
    float* oa = p.out + (t * H + h0 + r0) * kR + 256 * wg + 2 * c4;
    float* ob = oa + 8 * kR;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      *reinterpret_cast<float2*>(oa + 8 * i) = make_float2(o[4 * i] * i0, o[4 * i + 1] * i0);
      *reinterpret_cast<float2*>(ob + 8 * i) = make_float2(o[4 * i + 2] * i1, o[4 * i + 3] * i1);
    }
    if (w0 && p.lse != nullptr && c4 == 0) {
      constexpr float kLn2 = 0.6931471805599453f;
      p.lse[t * H + h0 + r0] = L0 > 0.0f ? mf0 * kLn2 + logf(L0) : kNegInf;
      p.lse[t * H + h0 + r0 + 8] = L1 > 0.0f ? mf1 * kLn2 + logf(L1) : kNegInf;
    }
  } else if (!kSeesaw && wg == 0) {
    // ------------------------------------------------ WG0: Q K^T, softmax, P V left
    RegAlloc<kRegsWg0>();
    const float sl2 = p.softmax_scale * 1.4426950408889634f;
    const uint64_t dq = NoSwizzleDesc(ptx::SmemAddr(sm.q), 1024, 128);
    // Items (one unless persistent); block b of item `it` is block it * nb + b
    // of the CTA's sequence (buffer and barrier phases).
    int it = 0;
#pragma unroll 1
    for (uint32_t x = x0; x < n_items; x += x_stride, ++it) {
    const int64_t t = x / uint32_t(head_blocks);  // this item's token and heads
    const int h0 = int(x % uint32_t(head_blocks)) * kRows;
    // Persistent, later items: WG0 and WG1 stage the item's Q (both are past
    // the last item's reads of it: WG0's Q K^T, and WG1 never reads it).
    if (kPersist && it > 0) {
      StageQ<256>(p, sm.q, t, h0, tid);
      ptx::FenceProxyAsync();  // Q is read by wgmma
      NamedSync(kBarQ, 256);
    }
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    float m0 = -1e30f, m1 = -1e30f, l0 = 0.0f, l1 = 0.0f;  // base-2 running max / sum
    if constexpr (kOverlap) {
      // Overlapped WG0 (kOverlap): block b+1's Q K^T is issued before block
      // b's P V, and block b+1's softmax runs while the tensor pipe does block
      // b's P V (WG0's and WG1's); P(b+1) goes to WG1 once P V(b) is done (the
      // rescale of O needs it). P(b) stays in registers (pr) until then.
      auto s_gemm = [&](int gb, float (&s)[32]) {
        consumer_wait(gb);
        const uint64_t dk = NoSwizzleDesc(ptx::SmemAddr(sm.kv[gb & 1]), 1024, 128);
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] = 0.0f;
        FenceRegs(s);
        ptx::WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kChunks / 2; ++kk) {
          WgmmaM64N64K16SS(s, dq + uint64_t(kk * 128), dk + uint64_t(kk * 128), kk > 0);
        }
        ptx::WgmmaCommit();
      };
      // Softmax of block gb (S in s) -> P in pr; returns O's rescale factors.
      auto softmax = [&](int gb, float (&s)[32], uint32_t (&pr)[16], float& f0, float& f1) {
        const uint8_t* valid = sm.valid[gb & 1];
        float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t v2 = *reinterpret_cast<const uint16_t*>(valid + 8 * i + 2 * c4);
          const bool va = (v2 & 0xffu) != 0, vb = (v2 >> 8) != 0;
          s[4 * i] = va ? s[4 * i] * sl2 : kNegInf;
          s[4 * i + 1] = vb ? s[4 * i + 1] * sl2 : kNegInf;
          s[4 * i + 2] = va ? s[4 * i + 2] * sl2 : kNegInf;
          s[4 * i + 3] = vb ? s[4 * i + 3] * sl2 : kNegInf;
          mx0 = fmaxf(mx0, fmaxf(s[4 * i], s[4 * i + 1]));
          mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
        }
#pragma unroll
        for (int sh = 1; sh <= 2; sh <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, sh));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, sh));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        f0 = Exp2(m0 - mn0);
        f1 = Exp2(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float pa = Exp2(s[4 * i] - mn0), pb = Exp2(s[4 * i + 1] - mn0);
          const float pc = Exp2(s[4 * i + 2] - mn1), pd = Exp2(s[4 * i + 3] - mn1);
          sum0 += pa + pb;
          sum1 += pc + pd;
          pr[2 * i] = PackBf16x2(pa, pb);
          pr[2 * i + 1] = PackBf16x2(pc, pd);
        }
        l0 = l0 * f0 + sum0;
        l1 = l1 * f1 + sum1;
      };
      auto rescale = [&](float f0, float f1) {
        if (__any_sync(0xffffffffu, f0 != 1.0f || f1 != 1.0f)) {
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            o[4 * i] *= f0;
            o[4 * i + 1] *= f0;
            o[4 * i + 2] *= f1;
            o[4 * i + 3] *= f1;
          }
        }
      };
      auto hand = [&](const uint32_t (&pr)[16], float f0, float f1, bool first) {
        if (!first) NamedSync(kBarPFree, 256);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          *reinterpret_cast<uint32_t*>(sm.p + (i * 64 + r0) * 16 + 4 * c4) = pr[2 * i];
          *reinterpret_cast<uint32_t*>(sm.p + (i * 64 + r0 + 8) * 16 + 4 * c4) = pr[2 * i + 1];
        }
        if (c4 == 0) {
          sm.o_scale[r0] = f0;
          sm.o_scale[r0 + 8] = f1;
        }
        ptx::FenceProxyAsync();
        NamedArrive(kBarPReady, 256);
      };
      uint32_t pr[16];
      if (nb > 0) {
        float s[32];
        s_gemm(it * nb, s);
        ptx::WgmmaWait<0>();
        FenceRegs(s);
        float f0, f1;
        softmax(it * nb, s, pr, f0, f1);
        hand(pr, f0, f1, it == 0);
      }
#pragma unroll 1
      for (int b = 0; b < nb; ++b) {
        const int gb = it * nb + b;
        const bool more = b + 1 < nb;
        float s[32];
        if (more) s_gemm(gb + 1, s);
        const uint64_t dv = NoSwizzleDesc(ptx::SmemAddr(sm.kv[gb & 1]), 128, 1024);
        FenceRegs(o);
#pragma unroll
        for (int i = 0; i < 16; ++i) FenceReg(pr[i]);
        ptx::WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kBlk / 16; ++kk) {
          const uint32_t a[4] = {pr[4 * kk], pr[4 * kk + 1], pr[4 * kk + 2], pr[4 * kk + 3]};
          WgmmaM64N256K16RS(o, a, dv + uint64_t(kk * 16));
        }
        ptx::WgmmaCommit();
        if (more) {
          ptx::WgmmaWait<1>();  // Q K^T of b+1 (committed first) done; P V(b) may run on
          FenceRegs(s);
          uint32_t pr2[16];
          float f0, f1;
          softmax(gb + 1, s, pr2, f0, f1);
          ptx::WgmmaWait<0>();
          FenceRegs(o);
#pragma unroll
          for (int i = 0; i < 16; ++i) FenceReg(pr[i]);
          consumer_release(gb);
          rescale(f0, f1);
          hand(pr2, f0, f1, false);
#pragma unroll
          for (int i = 0; i < 16; ++i) pr[i] = pr2[i];
        } else {
          ptx::WgmmaWait<0>();
          FenceRegs(o);
#pragma unroll
          for (int i = 0; i < 16; ++i) FenceReg(pr[i]);
          consumer_release(gb);
        }
      }
    } else
    for (int b = 0; b < nb; ++b) {
      const int gb = it * nb + b;
      const int buf = gb & 1;
      consumer_wait(gb);
      if constexpr (kVariant == kVariantNoConsumer) {
        consumer_release(gb);
      } else {
        const uint32_t kv_addr = ptx::SmemAddr(sm.kv[buf]);
        const uint64_t dk = NoSwizzleDesc(kv_addr, 1024, 128);
        float s[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] = 0.0f;
        FenceRegs(s);
        ptx::WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kChunks / 2; ++kk) {
          WgmmaM64N64K16SS(s, dq + uint64_t(kk * 128), dk + uint64_t(kk * 128), kk > 0);
        }
        ptx::WgmmaCommit();
        // Late hand-over: block b-1's P (written last iteration) goes to WG1 now,
        // behind this Q K^T in the tensor pipe.
        if (kLate && b > 0) NamedArrive(kBarPReady, 256);
        ptx::WgmmaWait<0>();
        FenceRegs(s);

        // Mask, scale to base 2, row max over the block (quad of lanes).
        const uint8_t* valid = sm.valid[buf];
        float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t v2 = *reinterpret_cast<const uint16_t*>(valid + 8 * i + 2 * c4);
          const bool va = (v2 & 0xffu) != 0, vb = (v2 >> 8) != 0;
          s[4 * i] = va ? s[4 * i] * sl2 : kNegInf;
          s[4 * i + 1] = vb ? s[4 * i + 1] * sl2 : kNegInf;
          s[4 * i + 2] = va ? s[4 * i + 2] * sl2 : kNegInf;
          s[4 * i + 3] = vb ? s[4 * i + 3] * sl2 : kNegInf;
          mx0 = fmaxf(mx0, fmaxf(s[4 * i], s[4 * i + 1]));
          mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
        }
#pragma unroll
        for (int sh = 1; sh <= 2; sh <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, sh));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, sh));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float f0 = Exp2(m0 - mn0), f1 = Exp2(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        float sum0 = 0.0f, sum1 = 0.0f;
        uint32_t pr[16];  // P as the A fragments of P V: pr[2i] row r0, pr[2i+1] row r0+8
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float pa = Exp2(s[4 * i] - mn0), pb = Exp2(s[4 * i + 1] - mn0);
          const float pc = Exp2(s[4 * i + 2] - mn1), pd = Exp2(s[4 * i + 3] - mn1);
          sum0 += pa + pb;
          sum1 += pc + pd;
          pr[2 * i] = PackBf16x2(pa, pb);
          pr[2 * i + 1] = PackBf16x2(pc, pd);
        }
        l0 = l0 * f0 + sum0;
        l1 = l1 * f1 + sum1;
        if (__any_sync(0xffffffffu, f0 != 1.0f || f1 != 1.0f)) {  // the max moved
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            o[4 * i] *= f0;
            o[4 * i + 1] *= f0;
            o[4 * i + 2] *= f1;
            o[4 * i + 3] *= f1;
          }
        }

        // Hand P and the rescale factors to WG1 (once it has finished the last block's).
        if (b > 0 || it > 0) NamedSync(kBarPFree, 256);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          *reinterpret_cast<uint32_t*>(sm.p + (i * 64 + r0) * 16 + 4 * c4) = pr[2 * i];
          *reinterpret_cast<uint32_t*>(sm.p + (i * 64 + r0 + 8) * 16 + 4 * c4) = pr[2 * i + 1];
        }
        if (c4 == 0) {
          sm.o_scale[r0] = f0;
          sm.o_scale[r0 + 8] = f1;
        }
        ptx::FenceProxyAsync();
        if (!kLate) NamedArrive(kBarPReady, 256);

        // O[:, 0:256] += P V[:, 0:256]
        const uint64_t dv = NoSwizzleDesc(kv_addr, 128, 1024);
        FenceRegs(o);
#pragma unroll
        for (int i = 0; i < 16; ++i) FenceReg(pr[i]);
        ptx::WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kBlk / 16; ++kk) {
          const uint32_t a[4] = {pr[4 * kk], pr[4 * kk + 1], pr[4 * kk + 2], pr[4 * kk + 3]};
          WgmmaM64N256K16RS(o, a, dv + uint64_t(kk * 16));  // + 16 tokens = 256 bytes
        }
        ptx::WgmmaCommit();
        ptx::WgmmaWait<0>();
        FenceRegs(o);
#pragma unroll
        for (int i = 0; i < 16; ++i) FenceReg(pr[i]);  // read by the wgmma until the wait
        consumer_release(gb);
      }
    }
    if (kLate && kVariant != kVariantNoConsumer && nb > 0) NamedArrive(kBarPReady, 256);
    // Final sums: reduce each row's quad, publish for WG1.
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, sh);
      l1 += __shfl_xor_sync(0xffffffffu, l1, sh);
    }
    if (c4 == 0) {
      sm.row_l[it & 1][r0] = l0;  // by item parity: WG1 may still read the last item's
      sm.row_l[it & 1][r0 + 8] = l1;
      sm.row_m[r0] = m0;
      sm.row_m[r0 + 8] = m1;
    }
    NamedSync(kBarFinal, 256);
    const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    float* oa = p.out + (t * H + h0 + r0) * kR + 2 * c4;
    float* ob = oa + 8 * kR;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      *reinterpret_cast<float2*>(oa + 8 * i) = make_float2(o[4 * i] * i0, o[4 * i + 1] * i0);
      *reinterpret_cast<float2*>(ob + 8 * i) = make_float2(o[4 * i + 2] * i1, o[4 * i + 3] * i1);
    }
    if (p.lse != nullptr && c4 == 0) {
      constexpr float kLn2 = 0.6931471805599453f;
      p.lse[t * H + h0 + r0] = l0 > 0.0f ? m0 * kLn2 + logf(l0) : kNegInf;
      p.lse[t * H + h0 + r0 + 8] = l1 > 0.0f ? m1 * kLn2 + logf(l1) : kNegInf;
    }
      if constexpr (!kPersist) break;  // one item
    }  // items
  } else if (!kSeesaw && wg == 1) {
    // ------------------------------------------------------- WG1: P V right
    RegDealloc<kSplit ? kRegsWg1Split : kRegsWg1>();
    const uint64_t dp = NoSwizzleDesc(ptx::SmemAddr(sm.p), 1024, 128);
    int it = 0;
#pragma unroll 1
    for (uint32_t x = x0; x < n_items; x += x_stride, ++it) {
    const int64_t t = x / uint32_t(head_blocks);  // this item's token and heads
    const int h0 = int(x % uint32_t(head_blocks)) * kRows;
    if (kPersist && it > 0) {  // with WG0: this item's Q
      StageQ<256>(p, sm.q, t, h0, tid);
      ptx::FenceProxyAsync();
      NamedSync(kBarQ, 256);
    }
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    for (int b = 0; b < nb; ++b) {
      const int gb = it * nb + b;
      const int buf = gb & 1;
      if constexpr (kVariant == kVariantNoConsumer) {
        consumer_wait(gb);
        consumer_release(gb);
      } else {
        NamedSync(kBarPReady, 256);
        if constexpr (kAsync) ptx::FenceProxyAsync();  // as WG0's after its k_ready wait
        const float f0 = sm.o_scale[r0], f1 = sm.o_scale[r0 + 8];
        if (__any_sync(0xffffffffu, f0 != 1.0f || f1 != 1.0f)) {
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            o[4 * i] *= f0;
            o[4 * i + 1] *= f0;
            o[4 * i + 2] *= f1;
            o[4 * i + 3] *= f1;
          }
        }
        // V[:, 256:512] starts 32 chunks (32 * 64 * 16 bytes) into the buffer.
        const uint64_t dv = NoSwizzleDesc(ptx::SmemAddr(sm.kv[buf]) + 32 * 64 * 16, 128, 1024);
        FenceRegs(o);
        ptx::WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kBlk / 16; ++kk) {
          WgmmaM64N256K16SS(o, dp + uint64_t(kk * 128), dv + uint64_t(kk * 16));
        }
        ptx::WgmmaCommit();
        ptx::WgmmaWait<0>();
        FenceRegs(o);
        consumer_release(gb);
        if (b + 1 < nb || x + x_stride < n_items) NamedArrive(kBarPFree, 256);
      }
    }
    NamedSync(kBarFinal, 256);
    const float l0 = sm.row_l[it & 1][r0], l1 = sm.row_l[it & 1][r0 + 8];
    const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    float* oa = p.out + (t * H + h0 + r0) * kR + 256 + 2 * c4;
    float* ob = oa + 8 * kR;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      *reinterpret_cast<float2*>(oa + 8 * i) = make_float2(o[4 * i] * i0, o[4 * i + 1] * i0);
      *reinterpret_cast<float2*>(ob + 8 * i) = make_float2(o[4 * i + 2] * i1, o[4 * i + 3] * i1);
    }
      if constexpr (!kPersist) break;  // one item
    }  // items
  } else {
    // ---------------------------------------- producer: gather + dequantise
    // Thread pt owns token slots slot0 and slot0 + 32 of every block, 16 bytes
    // of each 64 (column `sub`). The index -> page -> record chain is spread
    // over iterations: at block b, block b+3's indices and block b+2's page
    // numbers load while block b's records do (and block b+2's records are
    // prefetched into L2 with kPrefetch).
    RegDealloc<kSeesaw  ? kRegsSeesawProducer
               : kSplit ? kRegsProducerSplit
                        : kRegsProducer>();
    const int pt = tid - 256;
    const int sub = lane >> 3;
    const int slot0 = (pt >> 5) * 8 + (lane & 7);
    const int seq = p.query_seq != nullptr ? p.query_seq[t] : 0;
    const int64_t ntok = p.cache.num_tokens[seq];
    const int32_t* ptab = p.cache.page_table + seq * p.cache.page_table_stride;
    const int32_t* idx_row = p.indices + t * p.topk;
    const size_t page_bytes = size_t(kPageTokens) * kRecordBytes;
    // Pair: the peer CTA's rank, k_ready barriers, buffers and valid flags.
    uint32_t peer_ready[2] = {0u, 0u};
    if constexpr (kPair) {
      const uint32_t peer = ClusterRank() ^ 1u;
      peer_ready[0] = MapaShared(ptx::SmemAddr(&sm.k_ready[0]), peer);
      peer_ready[1] = MapaShared(ptx::SmemAddr(&sm.k_ready[1]), peer);
    }
    auto producer_wait = [&](int b) {
      if constexpr (kNamed) {
        if (b >= 2) NamedSync(kBarFree0 + (b & 1), 384);
      } else if constexpr (kAsync || kLight) {
        MbarWait(&sm.k_free[b & 1], (uint32_t(b >> 1) & 1u) ^ 1u);  // no CCTL: loads stay in flight
      } else if constexpr (kPair) {
        MbarWaitCluster(&sm.k_free[b & 1], (uint32_t(b >> 1) & 1u) ^ 1u);
      } else {
        MbarWait(&sm.k_free[b & 1], (uint32_t(b >> 1) & 1u) ^ 1u);
      }
    };
    auto producer_publish = [&](int b) {
      if constexpr (kNamed) {
        NamedArrive(kBarReady0 + (b & 1), kReadyThreads);
      } else if constexpr (kAsync) {
        // One arrival per producer warp after its lanes' valid flags; warp 0
        // also expects the block's bytes (both halves, st.async from both CTAs).
        __syncwarp();
        if (lane == 0) {
          if (pt < 32) {
            MbarArriveExpectTx(&sm.k_ready[b & 1], uint32_t(kBlk * kChunks * 16));
          } else {
            MbarArrive(&sm.k_ready[b & 1]);
          }
        }
      } else {
        MbarArrive(&sm.k_ready[b & 1]);
        if constexpr (kPair) MbarArriveCluster((b & 1) ? peer_ready[1] : peer_ready[0]);
      }
    };
    if constexpr (kVariant == kVariantNoProducer) {
      // Zeroed buffers, every slot valid: the consumers run on defined data.
      for (int i = pt; i < 2 * kTileBytes / 16; i += 128) {
        reinterpret_cast<uint4*>(sm.kv[0])[i] = make_uint4(0u, 0u, 0u, 0u);
      }
      sm.valid[0][pt >> 1] = sm.valid[1][pt >> 1] = 1;
      ptx::FenceProxyAsync();
    }
    // Index of slot (slot0 + 32 r) of block b; -1 when outside top-k, -1 or >= the
    // sequence's length.
    auto load_index = [&](int b, int r) -> int32_t {
      const int i = b * kBlk + slot0 + 32 * r;
      const int32_t idx = b < nb && i < p.topk ? __ldg(idx_row + i) : -1;
      return idx >= 0 && idx < ntok ? idx : -1;
    };
    auto load_page = [&](int32_t idx) -> int32_t { return idx >= 0 ? __ldg(ptab + (idx >> 6)) : 0; };
    auto record = [&](int32_t idx, int32_t page) -> const uint8_t* {
      return p.cache.pool + size_t(page) * page_bytes + size_t(idx & 63) * kRecordBytes;
    };
    // Every 128-byte line of a record (offsets 0..640 and its last byte), over
    // the token's 4 threads.
    auto prefetch_record = [&](int32_t idx, int32_t page) {
      if (idx >= 0) {
        const uint8_t* rec = record(idx, page);
        PrefetchL2(rec + 128 * sub);
        if (sub < 3) PrefetchL2(rec + (sub == 0 ? 512 : sub == 1 ? 640 : kRecordBytes - 1));
      }
    };
    if constexpr (kPair && kBf16) {
      // Pair over up-converted bf16 rows: thread pt copies chunks sub + 4k
      // (k = 0..17) of slot `slot` of every block (the 4 threads of a slot read
      // 64 contiguous bytes per k) through registers into both CTAs' buffers.
      // Block b+1's loads are issued right after block b is published (they
      // fly while the thread waits for block b+1's buffer); kPrefetch also
      // prefetches block b+2's rows into L2 then.
      const int slot = int(ClusterRank()) * 32 + (pt >> 5) * 8 + (lane & 7);
      const uint32_t peer = ClusterRank() ^ 1u;
      const uint32_t kv_peer[2] = {MapaShared(ptx::SmemAddr(sm.kv[0]), peer),
                                   MapaShared(ptx::SmemAddr(sm.kv[1]), peer)};
      const uint32_t valid_peer[2] = {MapaShared(ptx::SmemAddr(&sm.valid[0][slot]), peer),
                                      MapaShared(ptx::SmemAddr(&sm.valid[1][slot]), peer)};
      // Per item (persistent: every item of the cluster).
      const uint8_t* rows = nullptr;
      const int32_t* it_idx = idx_row;
      int64_t it_ntok = ntok;
      auto set_item = [&](int64_t t_it) {
        const int s_it = p.query_seq != nullptr ? p.query_seq[t_it] : 0;
        it_ntok = p.cache.num_tokens[s_it];
        it_idx = p.indices + t_it * p.topk;
        const int64_t row0 = p.bf16_row_start != nullptr ? p.bf16_row_start[s_it] : 0;
        rows = reinterpret_cast<const uint8_t*>(p.bf16_rows + row0 * kW);
      };
      auto index_at = [&](int b, int s) -> int32_t {
        const int i = b * kBlk + s;
        const int32_t idx = b < nb && i < p.topk ? __ldg(it_idx + i) : -1;
        return idx >= 0 && idx < it_ntok ? idx : -1;
      };
      const uint32_t kv_local[2] = {ptx::SmemAddr(sm.kv[0]), ptx::SmemAddr(sm.kv[1])};
      const uint32_t ready_local[2] = {ptx::SmemAddr(&sm.k_ready[0]),
                                       ptx::SmemAddr(&sm.k_ready[1])};
      constexpr int kPer = kChunks / 4;  // 18
      uint4 r[kPer];
      auto issue = [&](int32_t idx) {
        if (idx >= 0) {
          const uint8_t* src = rows + int64_t(idx) * (kW * 2) + 16 * sub;
#pragma unroll
          for (int k = 0; k < kPer; ++k) r[k] = __ldg(reinterpret_cast<const uint4*>(src + 64 * k));
        } else {
#pragma unroll
          for (int k = 0; k < kPer; ++k) r[k] = make_uint4(0u, 0u, 0u, 0u);
        }
      };
      // The row's 9 lines (1152 bytes from a 128-byte aligned row start).
      auto prefetch_row = [&](int32_t idx) {
        if (idx >= 0) {
          const uint8_t* src = rows + int64_t(idx) * (kW * 2);
          PrefetchL2(src + 128 * sub);
          PrefetchL2(src + 128 * (sub + 4));
          if (sub == 0) PrefetchL2(src + 1024);
        }
      };
      int it = 0;
  #pragma unroll 1
    for (uint32_t x = x0; x < n_items; x += x_stride, ++it) {
      set_item(x / uint32_t(head_blocks));
      int32_t idx_cur = index_at(0, slot), idx_n1 = index_at(1, slot), idx_n2 = index_at(2, slot);
      int32_t pidx_cur = kAsync && sub == 1 ? index_at(0, slot ^ 32) : -1;
      issue(idx_cur);
      if constexpr (kPrefetch) prefetch_row(idx_n1);
      for (int b = 0; b < nb; ++b) {
        const int gb = it * nb + b;
        const int buf = gb & 1;
        const int32_t idx_n3 = index_at(b + 3, slot);
        const int32_t pidx_next = kAsync && sub == 1 ? index_at(b + 1, slot ^ 32) : -1;
        producer_wait(gb);
        const uint32_t base = uint32_t(slot) * 16u;
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const uint32_t off = base + uint32_t(sub + 4 * k) * 64u * 16u;
          if constexpr (kAsync) {
            StAsyncV4((buf ? kv_local[1] : kv_local[0]) + off, r[k],
                      buf ? ready_local[1] : ready_local[0]);
            StAsyncV4((buf ? kv_peer[1] : kv_peer[0]) + off, r[k],
                      buf ? peer_ready[1] : peer_ready[0]);
          } else {
            *reinterpret_cast<uint4*>(sm.kv[buf] + off) = r[k];
            StClusterV4((buf ? kv_peer[1] : kv_peer[0]) + off, r[k]);
          }
        }
        if constexpr (kAsync) {
          if (sub == 0) sm.valid[buf][slot] = idx_cur >= 0 ? 1 : 0;
          if (sub == 1) sm.valid[buf][slot ^ 32] = pidx_cur >= 0 ? 1 : 0;
          pidx_cur = pidx_next;
        } else {
          if (sub == 0) {
            sm.valid[buf][slot] = idx_cur >= 0 ? 1 : 0;
            StClusterU8(buf ? valid_peer[1] : valid_peer[0], idx_cur >= 0 ? 1u : 0u);
          }
          ptx::FenceProxyAsync();
          FenceProxyAsyncCluster();
        }
        producer_publish(gb);
        issue(idx_n1);
        if constexpr (kPrefetch) prefetch_row(idx_n2);
        idx_cur = idx_n1;
        idx_n1 = idx_n2;
        idx_n2 = idx_n3;
      }
        if constexpr (!kPersist) break;  // one item
      }  // items
      ClusterSync();  // no remote store or arrival into the peer after it exits
      return;
    }
    if constexpr (kSplit) {
      // Split producer (kSplit, pair over FP8 records): producer warps 0-1
      // (group 0) fill buffer 0 with the even blocks, warps 2-3 (group 1)
      // buffer 1 with the odd ones; each thread owns two token slots (16 of
      // every 64 bytes: column `sub`). A group's loads for its next block are
      // issued right after it publishes a block, so the fences of the publish
      // (proxy fences, the release.cluster arrivals) never wait for loads in
      // flight, and the loads have the consumers' whole time on the published
      // block to land (the buffer is free again only once it is consumed). The
      // index -> page chain runs further ahead the same way (index of block
      // +4 steps, page of +3, L2 prefetch of the records of +2 with kPrefetch).
      const int grp = pt >> 6, q = pt & 63;
      const int slot_a = int(ClusterRank()) * 32 + (q >> 5) * 8 + (lane & 7);  // and slot_a + 16
      const uint32_t peer = ClusterRank() ^ 1u;
      const uint32_t kv_peer = MapaShared(ptx::SmemAddr(sm.kv[grp]), peer);
      const uint32_t ready_peer = peer_ready[grp];
      auto idx_at = [&](int b, int r) -> int32_t {
        const int i = b * kBlk + slot_a + 16 * r;
        const int32_t idx = b < nb && i < p.topk ? __ldg(idx_row + i) : -1;
        return idx >= 0 && idx < ntok ? idx : -1;
      };
      PairRegs reg[2];
      auto issue = [&](int r, int32_t idx, int32_t page) {
        if (idx >= 0) {
          const uint8_t* rec = record(idx, page);
#pragma unroll
          for (int gi = 0; gi < 8; ++gi) {
            reg[r].raw[gi] = __ldg(reinterpret_cast<const uint4*>(rec + 64 * gi + 16 * sub));
          }
          reg[r].sc = __ldg(reinterpret_cast<const float4*>(rec + kR));
          reg[r].pe[0] = __ldg(reinterpret_cast<const uint4*>(rec + kR + 16 + 16 * sub));
          reg[r].pe[1] = __ldg(reinterpret_cast<const uint4*>(rec + kR + 16 + 16 * (sub + 4)));
        }
      };
      // Chain of this group's blocks B_k = grp + 2k: cur = B_k, n1 = B_{k+1}, ...
      int32_t i_cur[2], i_n1[2], i_n2[2], i_n3[2], g_n1[2], g_n2[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        i_cur[r] = idx_at(grp, r);
        i_n1[r] = idx_at(grp + 2, r);
        i_n2[r] = idx_at(grp + 4, r);
        i_n3[r] = idx_at(grp + 6, r);
      }
      int32_t g_cur[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        g_cur[r] = load_page(i_cur[r]);
        g_n1[r] = load_page(i_n1[r]);
        g_n2[r] = load_page(i_n2[r]);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) issue(r, i_cur[r], g_cur[r]);
      if constexpr (kPrefetch) {
#pragma unroll
        for (int r = 0; r < 2; ++r) prefetch_record(i_n1[r], g_n1[r]);
      }
      const uint32_t tile_local = ptx::SmemAddr(sm.kv[grp]);
      for (int b = grp; b < nb; b += 2) {
        producer_wait(b);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int slot = slot_a + 16 * r;
          auto store2 = [&](int chunk, const uint4 v) {
            const uint32_t off = uint32_t(chunk * 64 + slot) * 16u;
            *reinterpret_cast<uint4*>(sm.kv[grp] + off) = v;
            StClusterV4(kv_peer + off, v);
          };
          if (i_cur[r] >= 0) {
#pragma unroll
            for (int gi = 0; gi < 8; ++gi) {
              const float4 sc = reg[r].sc;
              const float sgi = gi < 2 ? sc.x : gi < 4 ? sc.y : gi < 6 ? sc.z : sc.w;
              uint4 lo, hi;
              Dequant16(reg[r].raw[gi], sgi, lo, hi);
              store2(8 * gi + 2 * sub, lo);
              store2(8 * gi + 2 * sub + 1, hi);
            }
            store2(kR / 8 + sub, reg[r].pe[0]);
            store2(kR / 8 + sub + 4, reg[r].pe[1]);
          } else {
            const uint4 z = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int c = 0; c < 16; ++c) store2(8 * (c >> 1) + 2 * sub + (c & 1), z);
            store2(kR / 8 + sub, z);
            store2(kR / 8 + sub + 4, z);
          }
          if (sub == 0) {
            sm.valid[grp][slot] = i_cur[r] >= 0 ? 1 : 0;
            StClusterU8(MapaShared(ptx::SmemAddr(&sm.valid[grp][slot]), peer),
                        i_cur[r] >= 0 ? 1u : 0u);
          }
        }
        (void)tile_local;
        ptx::FenceProxyAsync();
        FenceProxyAsyncCluster();
        MbarArrive(&sm.k_ready[grp]);
        MbarArriveCluster(ready_peer);
        // Only now the next loads: nothing in flight across the fences above.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          issue(r, i_n1[r], g_n1[r]);
          if constexpr (kPrefetch) prefetch_record(i_n2[r], g_n2[r]);
          const int32_t pg3 = load_page(i_n3[r]);
          const int32_t ix4 = idx_at(b + 8, r);
          i_cur[r] = i_n1[r];
          i_n1[r] = i_n2[r];
          i_n2[r] = i_n3[r];
          i_n3[r] = ix4;
          g_n1[r] = g_n2[r];
          g_n2[r] = pg3;
        }
      }
      ClusterSync();  // no remote store or arrival into the peer after it exits
      return;
    }
    if constexpr (kPairGather) {
      // Thread pt gathers slot `slot` of every block (PairGather). The chain
      // index (block b+2) -> page (b+1) -> record (b+1) runs ahead: block b+1's
      // record loads are in flight while block b's buffer is waited for and
      // block b is dequantised (two register sets, roles swapped per block).
      // kPrefetch: block b+3's records are prefetched into L2 at step b (two
      // steps before their loads), the chain one block longer (index b+4 ->
      // page b+3).
      const int slot = int(ClusterRank()) * 32 + (pt >> 5) * 8 + (lane & 7);  // = PairGather's
      const uint32_t peer = ClusterRank() ^ 1u;
      const uint32_t kv_peer[2] = {MapaShared(ptx::SmemAddr(sm.kv[0]), peer),
                                   MapaShared(ptx::SmemAddr(sm.kv[1]), peer)};
      const uint32_t valid_peer[2] = {MapaShared(ptx::SmemAddr(&sm.valid[0][slot]), peer),
                                      MapaShared(ptx::SmemAddr(&sm.valid[1][slot]), peer)};
      const uint32_t kv_local[2] = {ptx::SmemAddr(sm.kv[0]), ptx::SmemAddr(sm.kv[1])};
      const uint32_t ready_local[2] = {ptx::SmemAddr(&sm.k_ready[0]),
                                       ptx::SmemAddr(&sm.k_ready[1])};
      // Chunk `chunk` of this thread's slot, into both CTAs' buffer `buf`.
      auto store2 = [&](int buf, int chunk, const uint4 v) {
        const uint32_t off = uint32_t(chunk * 64 + slot) * 16u;
        if constexpr (kAsync) {
          StAsyncV4((buf ? kv_local[1] : kv_local[0]) + off, v,
                    buf ? ready_local[1] : ready_local[0]);
          StAsyncV4((buf ? kv_peer[1] : kv_peer[0]) + off, v, buf ? peer_ready[1] : peer_ready[0]);
        } else {
          *reinterpret_cast<uint4*>(sm.kv[buf] + off) = v;
          StClusterV4((buf ? kv_peer[1] : kv_peer[0]) + off, v);
        }
      };
      // Items (one unless persistent); the chain restarts at every item.
      int it = 0;
  #pragma unroll 1
    for (uint32_t x = x0; x < n_items; x += x_stride, ++it) {
      const PairGather g(p, x / uint32_t(head_blocks), nb, tid);
      if (!kEarly || it > 0) gather_indices(g);
      PairRegs ra, rb;
      g.Issue(ra, g_idx_cur, g_pg_cur);
      if constexpr (kPrefetch) g.Prefetch(g_idx_n2, g_pg_n2);
      // Block b from `cur` (loaded one step earlier); issues block b+1 into `nxt`.
      auto step = [&](int b, PairRegs& cur, PairRegs& nxt) {
        const int gb = it * nb + b;
        const int buf = gb & 1;
        // kAfter: block b+1's loads (and the chain's) only after block b is
        // published: the publish's fences then wait for no load in flight.
        if constexpr (!kAfter) g.Issue(nxt, g_idx_n1, g_pg_n1);
        // Without kPrefetch: pg_next = page of b+2, idx_next = index of b+3;
        // with it: page of b+3, index of b+4.
        int32_t pg_next = 0, idx_next = -1;
        if constexpr (!kAfter) {
          pg_next = g.Page(kPrefetch ? g_idx_n3 : g_idx_n2);
          idx_next = g.Index(b + (kPrefetch ? 4 : 3));
        }
        const int32_t pidx_next = kAsync && g.sub == 1 ? g.IndexPeer(b + 1) : -1;
        producer_wait(gb);
        if (g_idx_cur >= 0) {
#pragma unroll
          for (int gi = 0; gi < 8; ++gi) {
            const float sgi = gi < 2 ? cur.sc.x : gi < 4 ? cur.sc.y : gi < 6 ? cur.sc.z : cur.sc.w;
            uint4 lo, hi;
            Dequant16(cur.raw[gi], sgi, lo, hi);
            store2(buf, 8 * gi + 2 * sub, lo);
            store2(buf, 8 * gi + 2 * sub + 1, hi);
          }
          store2(buf, kR / 8 + sub, cur.pe[0]);
          store2(buf, kR / 8 + sub + 4, cur.pe[1]);
        } else {
          // Zeros: the slot's P is 0 and must not meet NaN bit patterns in V.
          const uint4 z = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
          for (int c = 0; c < 16; ++c) store2(buf, 8 * (c >> 1) + 2 * sub + (c & 1), z);
          store2(buf, kR / 8 + sub, z);
          store2(buf, kR / 8 + sub + 4, z);
        }
        if constexpr (kAsync) {
          if (sub == 0) sm.valid[buf][slot] = g_idx_cur >= 0 ? 1 : 0;
          if (sub == 1) sm.valid[buf][slot ^ 32] = g_pidx_cur >= 0 ? 1 : 0;
          g_pidx_cur = pidx_next;
        } else {
          if (sub == 0) {
            sm.valid[buf][slot] = g_idx_cur >= 0 ? 1 : 0;
            StClusterU8(buf ? valid_peer[1] : valid_peer[0], g_idx_cur >= 0 ? 1u : 0u);
          }
          ptx::FenceProxyAsync();
          FenceProxyAsyncCluster();
        }
        producer_publish(gb);
        if constexpr (kAfter) {
          g.Issue(nxt, g_idx_n1, g_pg_n1);
          pg_next = g.Page(kPrefetch ? g_idx_n3 : g_idx_n2);
          idx_next = g.Index(b + (kPrefetch ? 4 : 3));
        }
        g_idx_cur = g_idx_n1;
        g_idx_n1 = g_idx_n2;
        if constexpr (kPrefetch) {
          g.Prefetch(g_idx_n3, pg_next);
          g_pg_n1 = g_pg_n2;
          g_pg_n2 = pg_next;
          g_idx_n2 = g_idx_n3;
          g_idx_n3 = idx_next;
        } else {
          g_pg_n1 = pg_next;
          g_idx_n2 = idx_next;
        }
      };
      for (int b = 0; b < nb; b += 2) {
        step(b, ra, rb);
        if (b + 1 < nb) step(b + 1, rb, ra);
      }
        if constexpr (!kPersist) break;  // one item
      }  // items
      ClusterSync();  // no remote store or arrival into the peer after it exits
      return;
    }
    if constexpr (kBf16) {
      // Up-converted rows: thread pt copies chunks [36 h, 36 h + 36) (h = pt / 64)
      // of slot j = pt % 64; a warp's copies of one chunk are 32 consecutive
      // 16-byte slots of the tile. Block b's copies are issued once block b-2
      // is released and waited for (cp.async.wait_group) before block b is
      // published, so they fly while the consumers work on block b-1.
      const int j = pt & 63, half = pt >> 6;
      const int64_t row0 = p.bf16_row_start != nullptr ? p.bf16_row_start[seq] : 0;
      const uint8_t* rows = reinterpret_cast<const uint8_t*>(p.bf16_rows + row0 * kW);
      auto index_at = [&](int b) -> int32_t {
        const int i = b * kBlk + j;
        const int32_t idx = b < nb && i < p.topk ? __ldg(idx_row + i) : -1;
        return idx >= 0 && idx < ntok ? idx : -1;
      };
      auto issue = [&](int b, int32_t idx) {
        const uint32_t tile = ptx::SmemAddr(sm.kv[b & 1]) + uint32_t(j) * 16u;
        const uint8_t* src = rows + int64_t(idx >= 0 ? idx : 0) * (kW * 2);
        const uint32_t bytes = idx >= 0 ? 16u : 0u;
#pragma unroll 12
        for (int k = 0; k < kChunks / 2; ++k) {
          const int c = half * (kChunks / 2) + k;
          CpAsync16Zfill(tile + uint32_t(c) * 64u * 16u, src + c * 16, bytes);
        }
        ptx::CpAsyncCommit();
      };
      int32_t idx_b = index_at(0), idx_b1 = index_at(1);
      if (nb > 0) issue(0, idx_b);
      for (int b = 0; b < nb; ++b) {
        ptx::CpAsyncWait<0>();  // block b's rows have landed
        if (half == 0) sm.valid[b & 1][j] = idx_b >= 0 ? 1 : 0;
        ptx::FenceProxyAsync();
        producer_publish(b);
        if (b + 1 < nb) {
          producer_wait(b + 1);  // block b-1 released
          issue(b + 1, idx_b1);
        }
        idx_b = idx_b1;
        idx_b1 = index_at(b + 2);
      }
      return;
    }
    int32_t idx_cur[2] = {load_index(0, 0), load_index(0, 1)};
    int32_t idx_n1[2] = {load_index(1, 0), load_index(1, 1)};
    int32_t idx_n2[2] = {load_index(2, 0), load_index(2, 1)};
    int32_t pg_cur[2] = {load_page(idx_cur[0]), load_page(idx_cur[1])};
    int32_t pg_n1[2] = {load_page(idx_n1[0]), load_page(idx_n1[1])};
    if constexpr (kPrefetch && kVariant != kVariantNoProducer) {
      prefetch_record(idx_n1[0], pg_n1[0]);
      prefetch_record(idx_n1[1], pg_n1[1]);
    }
    for (int b = 0; b < nb; ++b) {
      const int buf = b & 1;
      if constexpr (kVariant == kVariantNoProducer) {
        producer_wait(b);
        producer_publish(b);
      } else {
        // Issue every load of both tokens before waiting for the buffer.
        uint4 raw[2][8], pe[2][2];
        float4 sc[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (idx_cur[r] >= 0) {
            const uint8_t* rec = record(idx_cur[r], pg_cur[r]);
#pragma unroll
            for (int gi = 0; gi < 8; ++gi) {
              raw[r][gi] = __ldg(reinterpret_cast<const uint4*>(rec + 64 * gi + 16 * sub));
            }
            sc[r] = __ldg(reinterpret_cast<const float4*>(rec + kR));
            pe[r][0] = __ldg(reinterpret_cast<const uint4*>(rec + kR + 16 + 16 * sub));
            pe[r][1] = __ldg(reinterpret_cast<const uint4*>(rec + kR + 16 + 16 * (sub + 4)));
          }
        }
        const int32_t pg_n2[2] = {load_page(idx_n2[0]), load_page(idx_n2[1])};
        const int32_t idx_n3[2] = {load_index(b + 3, 0), load_index(b + 3, 1)};
        producer_wait(b);
        uint8_t* tile = sm.kv[buf];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int slot = slot0 + 32 * r;
          if (idx_cur[r] >= 0) {
#pragma unroll
            for (int gi = 0; gi < 8; ++gi) {
              const float s = gi < 2 ? sc[r].x : gi < 4 ? sc[r].y : gi < 6 ? sc[r].z : sc[r].w;
              uint4 lo, hi;
              Dequant16(raw[r][gi], s, lo, hi);
              StoreChunk(tile, 8 * gi + 2 * sub, slot, lo);
              StoreChunk(tile, 8 * gi + 2 * sub + 1, slot, hi);
            }
            StoreChunk(tile, kR / 8 + sub, slot, pe[r][0]);
            StoreChunk(tile, kR / 8 + sub + 4, slot, pe[r][1]);
          } else {
            // Zeros: the slot's P is 0 and must not meet NaN bit patterns in V.
            const uint4 z = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int gi = 0; gi < 8; ++gi) {
              StoreChunk(tile, 8 * gi + 2 * sub, slot, z);
              StoreChunk(tile, 8 * gi + 2 * sub + 1, slot, z);
            }
            StoreChunk(tile, kR / 8 + sub, slot, z);
            StoreChunk(tile, kR / 8 + sub + 4, slot, z);
          }
          if (sub == 0) sm.valid[buf][slot] = idx_cur[r] >= 0 ? 1 : 0;
        }
        ptx::FenceProxyAsync();
        producer_publish(b);
        if constexpr (kPrefetch) {
          prefetch_record(idx_n2[0], pg_n2[0]);
          prefetch_record(idx_n2[1], pg_n2[1]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          idx_cur[r] = idx_n1[r];
          pg_cur[r] = pg_n1[r];
          idx_n1[r] = idx_n2[r];
          pg_n1[r] = pg_n2[r];
          idx_n2[r] = idx_n3[r];
        }
      }
    }
  }
  if constexpr (kPair) ClusterSync();  // every role but the pair producer's gather (above)
}

}  // namespace pd::kernels::cuda::mla_internal

#endif  // PD_KERNELS_CUDA_MLA_WGMMA_CUH_
