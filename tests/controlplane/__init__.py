"""A real Kubernetes control plane for the tests, built from Kubernetes' own Go modules.

`python -m tests.controlplane build` compiles etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kubectl once per machine (binaries.py); `python -m tests.controlplane up`
starts them on 127.0.0.1 with our node agent (plane.py, nodeagent.py) until interrupted.
"""
