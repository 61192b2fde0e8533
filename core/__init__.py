"""What every stage shares, below the runtime: manifests and errors, config-to-flags, spec parsing, the prompt
format, answer extraction and the step checks, run-directory locks. Imports neither torch nor the runtime.
"""
