# hsmgw with the AWS CloudHSM Client SDK 5 PKCS #11 library.
#
# AWS publishes the library as a .deb for each distribution; download the one for
# Debian/Ubuntu matching this image (see deploy/README.md) next to this file, then:
#
#   docker build -f deploy/container/cloudhsm.Dockerfile \
#       --build-arg BASE=hsmgw:0.1.0 --build-arg PKCS11_DEB=cloudhsm-pkcs11_latest_u22.04_amd64.deb \
#       -t hsmgw-cloudhsm:0.1.0 deploy/container
#
# The module lands at /opt/cloudhsm/lib/libcloudhsm_pkcs11.so, which is what the
# Kubernetes overlays' hsmgw.toml names. Its cluster configuration
# (/opt/cloudhsm/etc/cloudhsm-pkcs11.cfg) and the clusters' issuing CA certificate
# are mounted at run time from the hsmgw-cloudhsm ConfigMap, so that one image
# serves every region.

ARG BASE=hsmgw:0.1.0
FROM ${BASE}
ARG PKCS11_DEB
USER 0
COPY ${PKCS11_DEB} /tmp/cloudhsm-pkcs11.deb
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends /tmp/cloudhsm-pkcs11.deb \
 && rm -rf /var/lib/apt/lists/* /tmp/cloudhsm-pkcs11.deb \
 && test -f /opt/cloudhsm/lib/libcloudhsm_pkcs11.so \
 && install -d -o 10001 -g 10001 /opt/cloudhsm/run
USER 10001:10001
