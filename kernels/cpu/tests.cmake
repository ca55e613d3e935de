# CPU reference kernel tests (minitest; built in every configure).
pd_kernel_test(NAME kernels_ops_test SRCS cpu/ops_test.cc)
pd_kernel_test(NAME kernels_mla_test SRCS cpu/mla_test.cc)
pd_kernel_test(NAME kernels_indexer_test SRCS cpu/indexer_test.cc)
