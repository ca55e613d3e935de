// Placeholder: implemented by the kernels work in progress.
#include "kernels/ops.h"
