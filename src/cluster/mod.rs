//! Local cluster launcher. TO BE WRITTEN: see the task description.
