// Placeholder: work in progress.
#include <gtest/gtest.h>
