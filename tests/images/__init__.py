"""The container images' Dockerfiles and the memory image's entrypoint."""
