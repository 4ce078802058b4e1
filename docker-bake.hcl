# The same image builds infra's runner does (runner/images/builds.py), as bake targets for CI.
# tests/test_bake.py keeps targets, Dockerfiles and build args in line with the runner.
#
#   docker buildx bake base                      # CUDA base (pulls BASE_IMAGE)
#   docker buildx bake base-cpu                  # CPU base from the local infra-os:bookworm + wheelhouse/
#   python -m runner.images.builds context WORKDIR build/plugin-context
#   BASE_TAG=infra-base:cpu docker buildx bake plugins
#
# Bake needs buildx; where there is none (Debian's docker.io 20.10 CLI), `infra build` builds the
# same images through the engine API.

variable "INFRA_VERSION" {
  default = "0.1.0"
}

# CUDA-enabled PyTorch runtime: torch is already there and is kept.
variable "BASE_IMAGE" {
  default = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
}

# Made by scripts/make-base-os-image.sh on machines that cannot pull.
variable "CPU_BASE_IMAGE" {
  default = "infra-os:bookworm"
}

variable "CPU_TORCH_SPEC" {
  default = "torch==2.13.0"
}

variable "BASE_TAG" {
  default = "infra-base:latest"
}

variable "PLUGIN_CONTEXT" {
  default = "build/plugin-context"
}

variable "PLUGIN_TAG" {
  default = "infra-plugins:latest"
}

group "default" {
  targets = ["base"]
}

target "base" {
  context    = "."
  dockerfile = "images/base/Dockerfile"
  args = {
    BASE_IMAGE    = BASE_IMAGE
    INFRA_VERSION = INFRA_VERSION
  }
  labels = {
    "infra.kind"     = "base"
    "infra.version"  = INFRA_VERSION
    "infra.core_api" = "2" # runner.images.builds.CORE_API: what the core can do for the host
  }
  tags = [BASE_TAG]
}

target "base-cpu" {
  inherits = ["base"]
  args = {
    BASE_IMAGE    = CPU_BASE_IMAGE
    TORCH_SPEC    = CPU_TORCH_SPEC
    INFRA_VERSION = INFRA_VERSION
  }
  tags = ["infra-base:cpu"]
}

# Two stages (images/plugins/Dockerfile): requirements installed in `requirements`, copied into the
# last stage, which bake builds; the wheels stay in the first stage's layers.
target "plugins" {
  context    = PLUGIN_CONTEXT
  dockerfile = "Dockerfile"
  args = {
    BASE = BASE_TAG
  }
  labels = {
    "infra.kind"     = "plugins"
    "infra.version"  = INFRA_VERSION
    "infra.core_api" = "2" # runner.images.builds.CORE_API
  }
  tags = [PLUGIN_TAG]
}
