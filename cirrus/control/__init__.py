"""Control: the controller that reconciles APIs with replicas, and the state it keeps."""
