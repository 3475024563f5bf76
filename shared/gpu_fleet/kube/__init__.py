"""The Kubernetes bridge: Run and Budget objects in, status mirrors and bound pods out.

The only package that imports ``kubernetes_asyncio`` (an import-linter contract), and only in
``wire``.  Everything else here speaks to a small ``KubeClient`` protocol over plain dicts, so
the reconcile logic runs unchanged against the wire client, the in-memory fake and the emulator
(``gpu_fleet.kubesim``, which production code never imports).  The bridge talks to the fleet only
over NATS: it follows the ledger (the one truth) and sends fleet API commands; Kubernetes
objects are inputs and mirrors, never a second source of state.
"""
