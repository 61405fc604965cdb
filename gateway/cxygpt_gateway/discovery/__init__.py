"""Where models are served: a static file or Kubernetes ModelDeployments, behind one interface."""
