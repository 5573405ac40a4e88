"""What users create and read: pipelines, architectures, uploads, training sets, jobs and
models. Each module is session-first, keyword-only functions over the tables (and the object
store where a resource has objects); none calls another service or knows about threads. The
runtime (runtime/) builds on these; these never import the runtime."""
