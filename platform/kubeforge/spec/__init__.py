"""The manifest models (pydantic): the one source of truth for CLI, executor, jobs and CRDs.

`pipeline` holds the `ModelPipeline` manifest (its sections come from the stage registry,
`kubeforge.stages`), `deployment` the `ModelDeployment`, `load` reads and validates either from a
file, and one module per section holds that section's model. Import them from their modules: this
package imports nothing, so that the stage registry can import the sections it declares.
"""
