# Stand-in for nvidia/cuda:<12.x>-base-ubuntu24.04 (see README.md), for a build check of docker/worker-cuda.Dockerfile:
# Ubuntu noble with the image's NVIDIA_* and path settings. The real base adds cuda-cudart and cuda-compat from NVIDIA's
# apt repository (not reachable here); PyPI's torch brings its own CUDA runtime, so the build does not depend on them.
ARG ROOTFS
FROM ${ROOTFS}
# This machine's CA bundle (README.md), for pip in the build (apart from the system bundle, which the build's apt-get
# rewrites when it installs ca-certificates).
COPY host-ca.crt /etc/ssl/host-ca-bundle.crt
ENV PIP_CERT=/etc/ssl/host-ca-bundle.crt \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64
CMD ["bash"]
