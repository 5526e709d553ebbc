"""A planted out-of-bounds write for run2_sanitize.sh's probe: under `compute-sanitizer --tool
memcheck --kernel-name kns=lstm_` it must be reported, which shows that the sanitizer runs on this
device and that the kernel filter selects kernels whose names contain "lstm_" (a filter that matched
nothing would make every tool report 0 errors). The kernel is compiled at run time by CuPy (NVRTC),
which the GPU image has; without CuPy the probe says so and exits 3.

CuPy's memory pool is switched off so that the array is its own cudaMalloc and memcheck knows its
exact end. Without memcheck the stray write could only touch this throwaway process's memory."""
import sys

try:
    import cupy
except ImportError as e:
    print("sanitizer_probe: CuPy is not importable:", e)
    sys.exit(3)

cupy.cuda.set_allocator(None)
kernel = cupy.RawKernel(r"""
extern "C" __global__ void lstm_probe_oob(float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) x[i] = 1.0f;  // i == n is one past the end: the planted error
}
""", "lstm_probe_oob")
n = 256
x = cupy.zeros(n, dtype=cupy.float32)
try:
    kernel((2,), (256,), (x, cupy.int32(n)))
    cupy.cuda.runtime.deviceSynchronize()
    print("sanitizer_probe: kernel ran; sum of the in-bounds part", float(x.sum()))
except Exception as e:  # memcheck aborts the launch; its report is what the caller reads
    print("sanitizer_probe: launch reported", type(e).__name__, e)
