"""Alternate questions (相似问法) on each pair, and the embeddings cache every process shares (issue 13)."""

import knowledge.models
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0003_source_message_moves_to_chat'),
    ]

    operations = [
        migrations.CreateModel(
            name='Embedding',
            fields=[
                ('key', models.CharField(max_length=64, primary_key=True, serialize=False, verbose_name='key')),
                ('model', models.CharField(max_length=200, verbose_name='embedding model')),
                ('vector', models.BinaryField(help_text='float32, little-endian', verbose_name='vector')),
                ('created_at', models.DateTimeField(auto_now_add=True, verbose_name='created at')),
            ],
            options={
                'verbose_name': 'embedding',
                'verbose_name_plural': 'embeddings',
            },
        ),
        migrations.AddField(
            model_name='qapair',
            name='alternates',
            field=models.JSONField(blank=True, default=list, encoder=knowledge.models.ReadableJSONEncoder, help_text='Other ways customers ask the same question (相似问法), e.g. 怎么退货 / 东西不想要了能退吗. Retrieval matches them like the question.', verbose_name='alternate questions'),
        ),
    ]
