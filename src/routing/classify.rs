//! Statement classification. TO BE WRITTEN: see the task description.
