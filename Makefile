# misa-pd: the two quick-start commands.
#   make demo   install what is missing, build, run the main job on the CPU
#   make test   install what is missing, build (CUDA sources too when nvcc is
#               present), run the whole CPU test suite
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_DIR ?= $(BUILD)/demo

.PHONY: all deps configure build test test-gpu demo kernels clean

all: build

deps:
	@scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD) -j$(JOBS)

test: build
	ctest --test-dir $(BUILD) --label-exclude "gpu|multi_gpu" --output-on-failure -j2 --timeout 1200

# GPU host: tests labelled gpu (needs a Hopper GPU).
test-gpu: build
	ctest --test-dir $(BUILD) --label-regex "gpu" --output-on-failure

demo: build
	@scripts/demo.sh $(BUILD) $(DEMO_DIR)

# The kernels-only configure (CUDA + the standard library alone), as on the GPU host.
kernels:
	@cmake -S . -B $(BUILD)-kernels -DPD_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD)-kernels -j$(JOBS)

clean:
	rm -rf $(BUILD) $(BUILD)-kernels
