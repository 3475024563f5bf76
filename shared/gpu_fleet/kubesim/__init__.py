"""A Kubernetes emulator for tests and ``make demo-k8s``; production code never imports it.

``store`` holds objects with the API server's semantics, ``server`` serves them over HTTP in
the real REST shapes, ``memory`` is the in-memory ``KubeClient`` fake for reconcile tests, and
``kubelet`` moves bound pods through their phases.
"""
