// Placeholder until the CPU reference kernels land; replaced by the real tests.
#include "kernels/testing/minitest.h"
