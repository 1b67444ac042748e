// Flash attention for XLA:CPU through XLA's FFI: float32, grouped kv heads, and the mask rule of
// attention/dense.py (same segment, key position <= query position, optional sliding window).
//
// Why a kernel: XLA:CPU runs each op of a blockwise loop as its own thunk, so small blocks pay
// dispatch and large ones leave the cache. Here a task owns one (batch, kv head, query or key
// block), keeps its tiles in L1/L2, skips fully masked blocks, and tasks are spread over XLA's
// intra-op thread pool. Built at first use by attention/cpu_kernel.py (g++ -O3 -march=native).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int W = 16;  // floats per vector
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return x - vf{}; }  // x + 0 would add: -0 + 0 is +0

// exp on 16 lanes: 2^n * e^r with |r| <= ln2/2 and a degree-7 Taylor polynomial (relative error
// below 2e-7); inputs under -87.3 (masked scores are -inf) give exactly 0.
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: t's low mantissa bits hold round(x / ln2)
  vf t = xc * 1.44269504088896341f + magic;
  vf n = t - magic;
  vf r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606820309417e-06f;
  vf p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi ti;
  std::memcpy(&ti, &t, sizeof ti);
  vi bits = (ti - 0x4B400000 + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  vf out = p * scale;
  return x < lo ? vf{} : out;
}

#ifdef __AVX512F__
inline float hmax(vf v) { return _mm512_reduce_max_ps(__m512(v)); }
inline float hsum(vf v) { return _mm512_reduce_add_ps(__m512(v)); }
#else
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
#endif

// C[R][16*JV] (+)= A[R][n] . B[n][16*JV]: one register tile (R x JV vectors of accumulators).
// Every product of attention takes this form: scores = q . k^T with k packed transposed, out += p . v,
// and (TA: A stored transposed, [n][R]) dv += p^T . dO, dk += ds^T . q. R = 6, JV = 4 (24
// accumulators) measured fastest on AVX-512.
template <int R, int JV, bool ACC, bool TA>
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int n) {
  vf acc[R][JV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < JV; ++u) acc[r][u] = ACC ? load(c + r * ldc + u * W) : vf{};
  for (int j = 0; j < n; ++j) {
    vf bj[JV];
    for (int u = 0; u < JV; ++u) bj[u] = load(b + j * ldb + u * W);
    for (int r = 0; r < R; ++r) {
      const vf ar = splat(TA ? a[j * lda + r] : a[r * lda + j]);
      for (int u = 0; u < JV; ++u) acc[r][u] += ar * bj[u];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < JV; ++u) store(c + r * ldc + u * W, acc[r][u]);
}

template <int R, bool ACC, bool TA>
inline void tile_cols(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int n, int cols) {
  int u = 0;
  for (; u + 4 * W <= cols; u += 4 * W) tile<R, 4, ACC, TA>(a, lda, b + u, ldb, c + u, ldc, n);
  switch ((cols - u) / W) {
    case 3: tile<R, 3, ACC, TA>(a, lda, b + u, ldb, c + u, ldc, n); break;
    case 2: tile<R, 2, ACC, TA>(a, lda, b + u, ldb, c + u, ldc, n); break;
    case 1: tile<R, 1, ACC, TA>(a, lda, b + u, ldb, c + u, ldc, n); break;
    default: break;
  }
}

// C[rows][cols] (+)= A[rows][n] . B[n][cols] (TA: A given as [n][rows]); cols a multiple of 16.
template <bool ACC, bool TA = false>
void gemm(int rows, int cols, int n, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  const auto rows_at = [&](int r) { return a + (TA ? r : r * lda); };
  int r = 0;
  for (; r + 6 <= rows; r += 6) tile_cols<6, ACC, TA>(rows_at(r), lda, b, ldb, c + r * ldc, ldc, n, cols);
  switch (rows - r) {
    case 5: tile_cols<5, ACC, TA>(rows_at(r), lda, b, ldb, c + r * ldc, ldc, n, cols); break;
    case 4: tile_cols<4, ACC, TA>(rows_at(r), lda, b, ldb, c + r * ldc, ldc, n, cols); break;
    case 3: tile_cols<3, ACC, TA>(rows_at(r), lda, b, ldb, c + r * ldc, ldc, n, cols); break;
    case 2: tile_cols<2, ACC, TA>(rows_at(r), lda, b, ldb, c + r * ldc, ldc, n, cols); break;
    case 1: tile_cols<1, ACC, TA>(rows_at(r), lda, b, ldb, c + r * ldc, ldc, n, cols); break;
    default: break;
  }
}

// 64-byte aligned float scratch (whole vectors never straddle cache lines).
class Scratch {
 public:
  explicit Scratch(size_t n, bool zero = false)
      : p_(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64))) {
    if (zero) std::memset(p_, 0, n * sizeof(float));
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() const { return p_; }
  float& operator[](size_t i) const { return p_[i]; }

 private:
  float* p_;
};

struct Dims {
  int64_t B, L, S, H, K, G, D;
  int64_t window;  // < 0: none
  int32_t window32;  // window clamped to int32
  float scale;
  int bq, bk;
  const int32_t *qpos, *kpos, *qseg, *kseg;
};

// Which of 16 keys (positions kp, segments ks) the query (qp, qs) sees: all lanes -1 or 0.
inline vi visible(const Dims& s, int32_t qp, int32_t qs, const int32_t* kp, const int32_t* ks) {
  vi p, g;
  std::memcpy(&p, kp, sizeof p);
  std::memcpy(&g, ks, sizeof g);
  vi ok = (g == qs) & (p <= qp);
  if (s.window >= 0) ok &= (qp - p) < s.window32;
  return ok;
}

struct Bounds { int32_t p0, p1, s0, s1; };

inline Bounds bounds(const int32_t* pos, const int32_t* seg, int64_t n) {
  Bounds b{pos[0], pos[0], seg[0], seg[0]};
  for (int64_t i = 1; i < n; ++i) {
    b.p0 = std::min(b.p0, pos[i]); b.p1 = std::max(b.p1, pos[i]);
    b.s0 = std::min(b.s0, seg[i]); b.s1 = std::max(b.s1, seg[i]);
  }
  return b;
}

enum Kind { kFull, kPartial, kEmpty };

// The rule of blockwise.block_kinds: FULL when every key is surely visible to every query.
inline Kind kind(const Dims& s, const Bounds& q, const Bounds& k) {
  bool maybe = k.p0 <= q.p1 && k.s0 <= q.s1 && q.s0 <= k.s1;
  bool full = k.p1 <= q.p0 && q.s0 == q.s1 && k.s0 == k.s1 && k.s0 == q.s0;
  if (s.window >= 0) {
    maybe = maybe && int64_t(q.p0) - k.p1 < s.window;
    full = full && int64_t(q.p1) - k.p0 < s.window;
  }
  return full ? kFull : (maybe ? kPartial : kEmpty);
}

// Work sharing over XLA's intra-op pool: the caller and up to `workers - 1` pool threads take tasks
// from one counter. A pool thread that starts after the caller has finished does nothing, so the
// caller never waits on a task that is still queued (no deadlock when the pool is busy).
struct Team {
  std::atomic<int64_t> next{0};
  int64_t n = 0;
  std::mutex mu;
  std::condition_variable cv;
  int active = 0, next_id = 1;
  bool closed = false;
};

template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int workers, const F& fn) {
  auto team = std::make_shared<Team>();
  team->n = n;
  const F* body = &fn;
  for (int w = 1; w < workers; ++w) {
    pool.Schedule([team, body] {
      int id;
      {
        std::lock_guard<std::mutex> lock(team->mu);
        if (team->closed) return;
        id = team->next_id++;
        ++team->active;
      }
      for (int64_t t; (t = team->next.fetch_add(1)) < team->n;) (*body)(t, id);
      std::lock_guard<std::mutex> lock(team->mu);
      if (--team->active == 0) team->cv.notify_all();
    });
  }
  for (int64_t t; (t = team->next.fetch_add(1)) < n;) fn(t, 0);
  std::unique_lock<std::mutex> lock(team->mu);
  team->closed = true;
  team->cv.wait(lock, [&] { return team->active == 0; });
}

int workers_for(ffi::ThreadPool& pool, int64_t tasks) {
  int64_t n = std::max<int64_t>(pool.num_threads(), 1);
  return int(std::min(n, std::max<int64_t>(tasks, 1)));
}

constexpr int kRowTile = 12;  // forward: query rows whose scores are made, softmaxed and used at once

// k^T in key blocks, [B][K][key block][D][keys of the block]: each block's q . k^T operand is
// contiguous (k^T rows of a whole sequence would sit a power of two apart and collide in cache).
void pack_keys(const Dims& s, const float* k, float* kt, int64_t t) {
  const int64_t D = s.D, nkb = (s.S + s.bk - 1) / s.bk;
  const int64_t b = t / (s.K * nkb), kh = (t / nkb) % s.K, j0 = (t % nkb) * s.bk;
  const int nj = int(std::min<int64_t>(s.bk, s.S - j0));
  float* dst = kt + t * D * s.bk;
  for (int j = 0; j < nj; ++j) {
    const float* src = k + ((b * s.S + j0 + j) * s.K + kh) * D;
    for (int64_t d = 0; d < D; ++d) dst[d * nj + j] = src[d];
  }
}

// One task: G heads x bq queries of (batch b, kv head kh) against every visible key block. q, v are
// read in place (rows H*D and K*D apart); scores stay unscaled until the exponent, s * scale - m.
void forward_task(const Dims& s, const float* q, const float* kt, const float* v, float* o, float* lse,
                  int64_t t) {
  const int64_t D = s.D, HD = s.H * D, nqb = (s.L + s.bq - 1) / s.bq, nkb = (s.S + s.bk - 1) / s.bk;
  const int64_t b = t / (s.K * nqb), kh = (t / nqb) % s.K, i0 = (t % nqb) * s.bq;
  const int ni = int(std::min<int64_t>(s.bq, s.L - i0)), rows = int(s.G) * ni;
  const int32_t *qpos = s.qpos + b * s.L + i0, *qseg = s.qseg + b * s.L + i0;
  Scratch acc(size_t(rows) * D, true), sc(size_t(kRowTile) * s.bk), l(size_t(rows) * W, true);  // l: 16 partial sums a row
  std::vector<float> m(rows, -1e30f);
  const Bounds qb = bounds(qpos, qseg, ni);
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = kb * s.bk;
    const int nj = int(std::min<int64_t>(s.bk, s.S - j0));
    const int32_t *kpos = s.kpos + b * s.S + j0, *kseg = s.kseg + b * s.S + j0;
    const Kind kd = kind(s, qb, bounds(kpos, kseg, nj));
    if (kd == kEmpty) continue;
    const float* ktb = kt + ((b * s.K + kh) * nkb + kb) * D * s.bk;
    const float* vb = v + ((b * s.S + j0) * s.K + kh) * D;
    for (int g = 0; g < s.G; ++g) {
      const float* qg = q + ((b * s.L + i0) * s.H + kh * s.G + g) * D;
      for (int i0r = 0; i0r < ni; i0r += kRowTile) {
        const int R = std::min(kRowTile, ni - i0r);
        gemm<false>(R, nj, int(D), qg + i0r * HD, HD, ktb, nj, sc.data(), nj);
        for (int r = 0; r < R; ++r) {
          const int i = i0r + r, row_at = g * ni + i;
          float* row = sc.data() + size_t(r) * nj;
          if (kd == kPartial)
            for (int j = 0; j < nj; j += W)
              store(row + j, visible(s, qpos[i], qseg[i], kpos + j, kseg + j) ? load(row + j) : splat(-INFINITY));
          vf mx = splat(-INFINITY);
          for (int j = 0; j < nj; j += W) { vf x = load(row + j); mx = x > mx ? x : mx; }
          const float m_old = m[row_at], m_new = std::max(m_old, hmax(mx) * s.scale);
          vf sum = {};
          for (int j = 0; j < nj; j += W) {
            vf p = vexp(load(row + j) * s.scale - m_new);
            store(row + j, p);
            sum += p;
          }
          const float corr = std::exp(m_old - m_new);
          m[row_at] = m_new;
          float* lr = l.data() + size_t(row_at) * W;
          store(lr, load(lr) * corr + sum);
          if (corr != 1.0f) {
            float* a = acc.data() + size_t(row_at) * D;
            for (int64_t d = 0; d < D; d += W) store(a + d, load(a + d) * corr);
          }
        }
        gemm<true>(R, int(D), nj, sc.data(), nj, vb, s.K * D, acc.data() + size_t(g * ni + i0r) * D, D);
      }
    }
  }
  for (int g = 0; g < s.G; ++g)
    for (int i = 0; i < ni; ++i) {
      const int r = g * ni + i;
      const float l_r = hsum(load(l.data() + size_t(r) * W)), l_safe = l_r == 0.0f ? 1.0f : l_r, inv = 1.0f / l_safe;
      const int64_t h = kh * s.G + g;
      float* dst = o + ((b * s.L + i0 + i) * s.H + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[size_t(r) * D + d] * inv;
      lse[(b * s.H + h) * s.L + i0 + i] = m[r] + std::log(l_safe);
    }
}

// One task: bk keys of (batch b, kv head kh) against every query block (of all G heads) that sees
// them. dk, dv are the task's own; dq goes to the worker's buffer (summed by the caller). q, k, dO
// are read in place; the transposed products (dv += P^T dO, dk += dS^T q) read P, dS as stored.
void backward_task(const Dims& s, const float* q, const float* k, const float* v, const float* dout,
                   const float* lse, const float* delta, float* dq, float* dk, float* dv, int64_t t) {
  const int64_t D = s.D, HD = s.H * D, nqb = (s.L + s.bq - 1) / s.bq, nkb = (s.S + s.bk - 1) / s.bk;
  const int64_t b = t / (s.K * nkb), kh = (t / nkb) % s.K, j0 = (t % nkb) * s.bk;
  const int nj = int(std::min<int64_t>(s.bk, s.S - j0));
  const int32_t *kpos = s.kpos + b * s.S + j0, *kseg = s.kseg + b * s.S + j0;
  const Bounds kbnd = bounds(kpos, kseg, nj);
  const float* kb = k + ((b * s.S + j0) * s.K + kh) * D;
  Scratch kt(size_t(D) * nj), vt(size_t(D) * nj), dkb(size_t(nj) * D, true), dvb(size_t(nj) * D, true),
      ds(size_t(s.bq) * nj), pb(size_t(s.bq) * nj);
  for (int j = 0; j < nj; ++j) {
    const float* ks = kb + j * s.K * D;
    const float* vs = v + ((b * s.S + j0 + j) * s.K + kh) * D;
    for (int64_t d = 0; d < D; ++d) {
      kt[size_t(d) * nj + j] = ks[d];
      vt[size_t(d) * nj + j] = vs[d];
    }
  }
  for (int64_t qb = 0; qb < nqb; ++qb) {
    const int64_t i0 = qb * s.bq;
    const int ni = int(std::min<int64_t>(s.bq, s.L - i0));
    const int32_t *qpos = s.qpos + b * s.L + i0, *qseg = s.qseg + b * s.L + i0;
    const Kind kd = kind(s, bounds(qpos, qseg, ni), kbnd);
    if (kd == kEmpty) continue;
    for (int g = 0; g < s.G; ++g) {
      const int64_t h = kh * s.G + g;
      const size_t at = ((b * s.L + i0) * s.H + h) * D;
      const float* lse_q = lse + (b * s.H + h) * s.L + i0;
      const float* delta_q = delta + (b * s.H + h) * s.L + i0;
      gemm<false>(ni, nj, int(D), q + at, HD, kt.data(), nj, ds.data(), nj);     // q k^T
      gemm<false>(ni, nj, int(D), dout + at, HD, vt.data(), nj, pb.data(), nj);  // dP = dO v^T
      for (int i = 0; i < ni; ++i) {
        float* srow = ds.data() + size_t(i) * nj;
        float* prow = pb.data() + size_t(i) * nj;
        const float lse_i = lse_q[i], delta_i = delta_q[i];
        for (int j = 0; j < nj; j += W) {
          vf p = vexp(load(srow + j) * s.scale - lse_i);
          if (kd == kPartial) p = visible(s, qpos[i], qseg[i], kpos + j, kseg + j) ? p : vf{};
          store(srow + j, p * (load(prow + j) - delta_i));  // dS (of the scaled scores)
          store(prow + j, p);                               // P
        }
      }
      gemm<true>(ni, int(D), nj, ds.data(), nj, kb, s.K * D, dq + at, HD);              // dq += dS k
      gemm<true, true>(nj, int(D), ni, pb.data(), nj, dout + at, HD, dvb.data(), D);     // dv += P^T dO
      gemm<true, true>(nj, int(D), ni, ds.data(), nj, q + at, HD, dkb.data(), D);        // dk += dS^T q
    }
  }
  for (int j = 0; j < nj; ++j) {
    float* dks = dk + ((b * s.S + j0 + j) * s.K + kh) * D;
    for (int64_t d = 0; d < D; ++d) dks[d] = dkb[size_t(j) * D + d] * s.scale;
    std::memcpy(dv + ((b * s.S + j0 + j) * s.K + kh) * D, dvb.data() + size_t(j) * D, sizeof(float) * D);
  }
}

void forward(ffi::ThreadPool& pool, const Dims& s, const float* q, const float* k, const float* v, float* o, float* lse) {
  const int64_t key_blocks = s.B * s.K * ((s.S + s.bk - 1) / s.bk), tasks = s.B * s.K * ((s.L + s.bq - 1) / s.bq);
  Scratch kt(size_t(key_blocks) * s.D * s.bk);
  parallel_for(pool, key_blocks, workers_for(pool, key_blocks), [&](int64_t t, int) { pack_keys(s, k, kt.data(), t); });
  parallel_for(pool, tasks, workers_for(pool, tasks), [&](int64_t t, int) { forward_task(s, q, kt.data(), v, o, lse, t); });
}

void backward(ffi::ThreadPool& pool, const Dims& s, const float* q, const float* k, const float* v, const float* o,
              const float* dout, const float* lse, float* dq, float* dk, float* dv) {
  const int64_t D = s.D, rows = s.B * s.L * s.H;
  const size_t n = size_t(rows) * D;
  constexpr int64_t kRows = 1024;  // rows of dO, O and dq per task of the passes before and after
  const int64_t row_tasks = (rows + kRows - 1) / kRows, tasks = s.B * s.K * ((s.S + s.bk - 1) / s.bk);
  const int workers = workers_for(pool, tasks);
  std::vector<float> delta(static_cast<size_t>(rows));  // rowsum(dO * O), [B][H][L]
  std::vector<std::unique_ptr<Scratch>> extra;  // dq of workers 1.. (worker 0 accumulates into dq)
  for (int w = 1; w < workers; ++w) extra.push_back(std::make_unique<Scratch>(n));
  parallel_for(pool, row_tasks, workers_for(pool, row_tasks), [&](int64_t t, int) {
    for (int64_t r = t * kRows; r < std::min(rows, (t + 1) * kRows); ++r) {  // r = (b * L + i) * H + h
      const int64_t b = r / (s.L * s.H), i = (r / s.H) % s.L, h = r % s.H;
      vf acc = {};
      for (int64_t d = 0; d < D; d += W) acc += load(dout + r * D + d) * load(o + r * D + d);
      delta[size_t((b * s.H + h) * s.L + i)] = hsum(acc);
      std::memset(dq + r * D, 0, sizeof(float) * D);
      for (auto& e : extra) std::memset(e->data() + r * D, 0, sizeof(float) * D);
    }
  });
  parallel_for(pool, tasks, workers, [&](int64_t t, int w) {
    backward_task(s, q, k, v, dout, lse, delta.data(), w ? extra[w - 1]->data() : dq, dk, dv, t);
  });
  parallel_for(pool, row_tasks, workers_for(pool, row_tasks), [&](int64_t t, int) {
    const size_t end = std::min(n, size_t((t + 1) * kRows * D));
    for (size_t i = size_t(t * kRows * D); i < end; i += W) {
      vf x = load(dq + i);
      for (auto& e : extra) x += load(e->data() + i);
      store(dq + i, x * s.scale);
    }
  });
}

ffi::Error check(const Dims& s) {
  if (s.D % W || s.D < W || s.D > 16 * W)
    return ffi::Error::InvalidArgument("flash_cpu: head_dim must be a multiple of 16 in [16, 256]");
  if (s.L % W || s.S % W || s.bq % W || s.bk % W || s.bq <= 0 || s.bk <= 0)
    return ffi::Error::InvalidArgument("flash_cpu: lengths and block sizes must be positive multiples of 16");
  if (s.K < 1 || s.H % s.K) return ffi::Error::InvalidArgument("flash_cpu: query heads must be a multiple of kv heads");
  return ffi::Error::Success();
}

Dims dims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::S32>& qpos, ffi::Buffer<ffi::S32>& kpos,
          ffi::Buffer<ffi::S32>& qseg, ffi::Buffer<ffi::S32>& kseg, int64_t window, float scale, int64_t bq, int64_t bk) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const int32_t window32 = int32_t(std::min<int64_t>(window, INT32_MAX));
  return Dims{qd[0], qd[1], kd[1], qd[2], kd[2], kd[2] ? qd[2] / kd[2] : 1, qd[3], window, window32, scale, int(bq), int(bk),
              qpos.typed_data(), kpos.typed_data(), qseg.typed_data(), kseg.typed_data()};
}

ffi::Error FlashForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::S32> kpos,
                        ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg, ffi::ResultBuffer<ffi::F32> o,
                        ffi::ResultBuffer<ffi::F32> lse, int64_t window, float scale, int64_t block_q,
                        int64_t block_k) {
  const Dims s = dims(q, k, qpos, kpos, qseg, kseg, window, scale, block_q, block_k);
  if (ffi::Error e = check(s); e.failure()) return e;
  forward(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error FlashBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> dout,
                         ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::S32> kpos,
                         ffi::Buffer<ffi::S32> qseg, ffi::Buffer<ffi::S32> kseg, ffi::ResultBuffer<ffi::F32> dq,
                         ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, int64_t window, float scale,
                         int64_t block_q, int64_t block_k) {
  const Dims s = dims(q, k, qpos, kpos, qseg, kseg, window, scale, block_q, block_k);
  if (ffi::Error e = check(s); e.failure()) return e;
  backward(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), dout.typed_data(),
           lse.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data());
  return ffi::Error::Success();
}

// A copy into XLA's output buffer. XLA:CPU cannot fuse a custom call's producer into its consumers,
// so e.g. the rotary cos/sin [B, L, d] are computed once instead of once per head in every consumer.
ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  if (x.size_bytes() != out->size_bytes()) return ffi::Error::InvalidArgument("materialize: size mismatch");
  if (x.size_bytes()) std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongropeMaterialize, Materialize,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongropeFlashForward, FlashForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongropeFlashBackward, FlashBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));
